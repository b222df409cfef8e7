"""Governed tool calls: what ``ctx.tool(...)`` writes, on the coordination thread. A call is
recorded (``ToolCall``), waits for its entity locks and then for a slot under its tool's caps,
runs through the ledger, and gives its slot and locks back when it ends.

The caps are the ones admission applies (``RUNWARDEN_CAPS["tool"]`` and a tenant's own
``caps["tool"]``): they count the steps admitted with that ``tool`` AND the calls running with
it (``runs.dispatch.load_room`` counts both). A slot is granted under the whole admission lock,
as a round admits, so neither can fill a scope behind the other's back. A call whose tool is
its step's own declared tool runs in the step's slot: it was counted when the step was
admitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from core import rawsql
from core.leases import LeaseGrant, StaleToken, lease_acquire, lease_fence, leases_release
from core.models import TenantQuota
from core.validation import fingerprint
from core.wakeups import wake_on_commit
from runs import gates, transitions
from runs.definitions import ApprovalPolicy
from runs.dispatch import load_room, wait_for_round_lock
from runs.gates import GateVerdict
from runs.interrupts import LeaseLost
from runs.locking import run_steps_lock
from runs.models import EffectStatus, Run, SideEffect, Step, ToolCall, ToolCallStatus
from runs.slot_waits import slot_released


def call_idempotency_key(run_id: str, step_key: str, call_key: str) -> str:
    """The ledger key of a governed call: stable across attempts and replays of its step."""
    return f"{run_id}:{step_key}:call:{call_key}"


@dataclass(frozen=True)
class Recorded:
    """A call the ledger already answered (an earlier attempt of the step made it)."""

    result: Any
    effect: SideEffect


class CallDiverged(Exception):  # noqa: N818 — what the step fails with
    """The step made, at one of its calls' places, another call than when it ran before (another
    tool, another request): its recorded result cannot answer it, and sending it anew could
    repeat an effect. Not retried: a body must make the same calls in the same order, deciding
    only from its inputs and its calls' recorded results."""


def call_open(
    *, run: Run, step: Step, call_key: str, tool: str, request: dict[str, Any], lock_keys: list[str]
) -> ToolCall | Recorded:
    """Record the call (or find it, made by an earlier attempt): the ledger's result when it
    already committed, else the row this attempt goes on with, ``waiting``. CallDiverged when
    an earlier attempt made another call at this place."""
    effect = SideEffect.objects.filter(
        idempotency_key=call_idempotency_key(run.id, step.key, call_key), status=EffectStatus.COMMITTED
    ).first()
    call, created = ToolCall.objects.get_or_create(
        step=step,
        key=call_key,
        defaults={
            "tenant_id": run.tenant_id,
            "run": run,
            "tool": tool,
            "request": request,
            "lock_keys": lock_keys,
            "attempt": step.attempt,
        },
    )
    # The request as first proposed (a human may have approved an edited one: the ledger's).
    if not created and (call.tool != tool or fingerprint(call.request) != fingerprint(request)):
        raise CallDiverged(
            f"call {call_key} of step {step.key} was a {call.tool} call with request {call.request} "
            f"when the step ran before, and is a {tool} call with request {request} now: a step must "
            "make the same calls in the same order"
        )
    if effect is not None:
        if call.status != ToolCallStatus.SUCCEEDED:  # committed by a reviewer's confirmation
            call_finish(call, ToolCallStatus.SUCCEEDED, idempotency_key=effect.idempotency_key)
        return Recorded(effect.result, effect)
    if not created:  # this attempt's now: an older attempt still running writes no more to it
        ToolCall.objects.filter(pk=call.pk).update(attempt=step.attempt, updated_at=timezone.now())
        call.attempt = step.attempt
    return call


def tool_caps(tenant_id: int, tool: str) -> dict[str, int]:
    """The caps a call of ``tool`` counts against, by admission scope (none: uncapped)."""
    caps: dict[str, int] = {}
    platform = settings.RUNWARDEN_CAPS.get("tool", {}).get(tool)
    if platform is not None:
        caps[f"tool:{tool}"] = int(platform)
    own = TenantQuota.objects.filter(tenant_id=tenant_id).values_list("caps", flat=True).first() or {}
    if (mine := (own.get("tool") or {}).get(tool)) is not None:
        caps[f"tenant_tool:{tenant_id}:{tool}"] = int(mine)
    return caps


def slot_try_take(
    *, call: ToolCall, caps: dict[str, int], holder: str, ttl: float, now: datetime | None = None
) -> LeaseGrant | None:
    """One attempt at a slot under every cap in ``caps``: the slot's lease, or None while one
    of them is full, or while another attempt at a slot of the same tool is under way
    (``_alone_for_its_tool``). Under the whole admission lock (every shard): a round, a
    worker's own admission and other calls count and grant one at a time."""

    def full(at: datetime) -> bool:
        room = load_room(at, pools_max_age=1.0, tool=call.tool)
        return any(room.held[scope] >= cap for scope, cap in caps.items())

    if full(now or timezone.now()):  # a look without the lock first: a full cap holds up nobody
        return None
    with transaction.atomic():
        if not _alone_for_its_tool(call.tool):
            return None
        wait_for_round_lock()
        at = now or timezone.now()  # after the wait: the slot is counted from when it is granted
        # First write of the transaction: on SQLite, the writer's lock before the count.
        ToolCall.objects.filter(pk=call.pk).update(updated_at=at)
        if full(at):
            return None
        grant = lease_acquire(
            tenant_id=call.tenant_id,
            key=_slot_key(call),
            holder=holder,
            ttl=ttl,
            metadata={"run_id": call.run_id, "step_id": call.step_id, "tool": call.tool},
            now=at,
        )
        if grant is None:  # only a dead attempt's slot of this same call: it frees itself
            return None
        call_running(call, grant, now=at)
        return grant


# The seed of the advisory lock keys of ``_alone_for_its_tool``: one bigint key per tool, hashed
# with a seed of its own (the sessions' keys are seeded 7411003; the dispatcher's lock is the
# bigint 7411002), so a collision is as likely as one of two 64-bit hashes.
TOOL_SLOT_LOCK_SEED = 7_411_004


def _alone_for_its_tool(tool: str) -> bool:
    """Whether this is the only attempt at a slot of ``tool`` taking the whole admission lock
    now: a transaction-level advisory lock per tool, taken without waiting (PostgreSQL; SQLite
    lets one writer in at a time). Attempts that queued behind each other for the whole lock
    each held the shards they had while waiting for the rest, so a step's end, which takes one
    shard, waited behind them; and all but the first found the slot taken once they got in. A
    call that finds another attempt under way waits as for a full cap (``runs.slot_waits``)."""
    if not rawsql.on_postgresql():
        return True
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, %s))", [tool, TOOL_SLOT_LOCK_SEED]
        )
        return bool(cursor.fetchone()[0])


def mine(call: ToolCall) -> QuerySet[ToolCall]:
    """The call's row while the attempt that holds ``call`` is its latest (an older attempt
    still running, its lease lost, writes nothing)."""
    return ToolCall.objects.filter(pk=call.pk, attempt=call.attempt)


def call_running(call: ToolCall, slot: LeaseGrant | None, *, now: datetime | None = None) -> None:
    now = now or timezone.now()
    mine(call).update(
        status=ToolCallStatus.RUNNING,
        lease_id=slot.id if slot else None,
        lease_token=slot.token if slot else None,
        started_at=now,
        error="",
        updated_at=now,
    )


def call_finish(
    call: ToolCall,
    status: str,
    *,
    idempotency_key: str,
    error: str = "",
    release: list[LeaseGrant] | None = None,
    lock_wait_ms: float | None = None,
    cap_wait_ms: float | None = None,
) -> None:
    """The call ended: its record (with the ledger's row and its waits), and its slot and
    locks given back, in one transaction."""
    now = timezone.now()
    with transaction.atomic():
        mine(call).update(
            status=status,
            effect_id=SideEffect.objects.filter(idempotency_key=idempotency_key).values("pk")[:1],
            error=error[:2000],
            lock_wait_ms=lock_wait_ms,
            cap_wait_ms=cap_wait_ms,
            finished_at=now,
            updated_at=now,
        )
        if release:
            _give_back(call, release, now)


def call_give_back(call: ToolCall, held: list[LeaseGrant]) -> None:
    """A call stopped from outside (a timeout, a lost lease, a cancel) gives back its slot and
    locks, those its tokens still hold."""
    if held:
        with transaction.atomic():
            _give_back(call, held, timezone.now())


def _slot_key(call: ToolCall) -> str:
    """The lease key of the call's slot under its tool's caps."""
    return f"toolcall:{call.pk}"


def _give_back(call: ToolCall, held: list[LeaseGrant], now: datetime) -> None:
    if leases_release(held, now=now):
        # Its slot counted under its tool's caps, its locks kept their keys: a step left
        # waiting for either may go now, not at the dispatcher's next sweep.
        wake_on_commit(only_if_waiting=True)
        if any(grant.key == _slot_key(call) for grant in held):
            # And a call of this process waiting for a slot of the same tool, at once.
            transaction.on_commit(partial(slot_released, call.tool))


def call_approval(
    *,
    run: Run,
    step: Step,
    lease: LeaseGrant,
    grants: list[LeaseGrant],
    call: ToolCall,
    request: dict[str, Any],
    policy: ApprovalPolicy,
    started_from: dict[str, Any] | None = None,
) -> GateVerdict:
    """Ask the approval gate about this call. ``waiting``: its request is open and the step
    parked, holding nothing (``grants`` released), in this one transaction, so a decision that
    commits after it always finds the step waiting. Taken like a person's action on the run
    (runs/locking.py): the run's step rows first, then the step's lease (fenced: a stale
    attempt parks nothing), then the artifact."""
    with transaction.atomic():
        run_steps_lock(run.id)
        try:
            lease_fence(tenant_id=lease.tenant_id, key=lease.key, token=lease.token)
        except StaleToken:
            raise LeaseLost(f"step {step.key} of {run.id} lost its lease") from None
        verdict = gates.get_gate().check_call(
            run=run, step=step, call_key=call.key, tool=call.tool, request=request, policy=policy
        )
        if verdict.state == "waiting":
            transitions.step_inputs_remember(step, started_from)  # it runs again once decided
            transitions.step_park(step=step, grants=grants, approval_id=verdict.approval_id, mid_step=True)
            ToolCall.objects.filter(pk=call.pk).update(
                status=ToolCallStatus.AWAITING_APPROVAL,
                approval_id=verdict.approval_id,
                updated_at=timezone.now(),
            )
        elif verdict.state == "rejected":
            ToolCall.objects.filter(pk=call.pk).update(
                status=ToolCallStatus.REJECTED,
                approval_id=verdict.approval_id,
                error=verdict.reason[:2000],
                finished_at=timezone.now(),
                updated_at=timezone.now(),
            )
        else:
            ToolCall.objects.filter(pk=call.pk).update(
                approval_id=verdict.approval_id, updated_at=timezone.now()
            )
    return verdict


def call_guard(step: Step, call_key: str, verdict: GateVerdict) -> Callable[[], None]:
    """Run as an approved call's effect is proposed: raises ApprovalNoLongerValid if the
    call's request was edited or its approval invalidated since."""
    return lambda: gates.get_gate().guard_call(step=step, call_key=call_key, verdict=verdict)
