"""What a step body gets: its identity, its inputs, and the safe way to act on the world."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from core import coordination, metrics, tracing
from core.connections import BoundConnection, connection_for_run
from core.deadlocks import WaitWatch
from core.leases import (
    LeaseGrant,
    LockWait,
    StaleToken,
    lease_fence,
    leases_renew_many,
    locks_acquire,
    locks_try_acquire,
)
from runs import tools
from runs.definitions import ApprovalPolicy
from runs.gates import GateVerdict
from runs.interrupts import LeaseLost, Rejected, RunCancelled, StepParked
from runs.ledger import (
    INTERRUPTIONS,
    EffectClaim,
    EffectNotStarted,
    EffectOutcome,
    effect_claim,
    effect_execute,
    effect_settle,
    effect_settle_failed,
    effect_span,
    effect_traced,
    step_checkpoint,
)
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, ToolCallStatus
from runs.slot_waits import slot_wait, slot_wait_async, slots_released_so_far

T = TypeVar("T")
logger = logging.getLogger(__name__)

# ``approval=`` of a governed call: always (True, or a policy), or when a predicate of its
# request says so.
CallApproval = bool | ApprovalPolicy | Callable[[dict[str, Any]], bool] | None


def call_policy(
    approval: CallApproval, request: dict[str, Any], policy: ApprovalPolicy | None
) -> ApprovalPolicy | None:
    """The approval policy this call's request needs, or None when it needs none."""
    if approval is None or approval is False:
        return None
    if isinstance(approval, ApprovalPolicy):
        return approval
    if approval is True or approval(request):
        return policy or ApprovalPolicy()
    return None


class _SlotWait:
    """How long a call waits between looks for a slot under its tool's cap: full jitter,
    doubling up to a quarter second (the step's own timeout bounds the wait), unless a call of
    this process gives a slot back sooner (``runs.slot_waits``)."""

    def __init__(self) -> None:
        self.delay = 0.005

    def next_delay(self) -> float:
        delay, self.delay = random.uniform(0, self.delay), min(self.delay * 2, 0.25)
        return delay


@dataclass
class _Call:
    """One governed call in progress: its record, what it holds, and how long it waited."""

    record: Any  # runs.models.ToolCall
    request: dict[str, Any]
    guard: Callable[[], None] | None
    held: list[LeaseGrant] = field(default_factory=list)
    lock_wait_ms: float | None = None
    cap_wait_ms: float | None = None

    def proposal_guard(self) -> Callable[[], None]:
        """Run in the transaction that proposes the call's effect: every lock and slot the call
        holds must still be its own (fenced, as the step's lease is), and its approval hold."""
        held, guard = list(self.held), self.guard

        def check() -> None:
            for grant in held:
                lease_fence(tenant_id=grant.tenant_id, key=grant.key, token=grant.token)
            if guard is not None:
                guard()

        return check


@dataclass
class StepContext:
    """Handed to every step body.

    ``ctx.effect(kind, fn)`` is the only way a step should touch the outside world: the ledger
    makes a retry return the recorded result instead of acting twice. ``ctx.heartbeat()``
    renews the step's leases (a background thread also does so while the body runs) and raises
    StepInterrupted when the step must stop. ``ctx.checkpoint(data)`` saves progress that a
    take-over resumes from (``ctx.checkpoint_data``).
    """

    run: Run
    step: Step
    lease: LeaseGrant
    lease_seconds: float
    input: dict[str, Any]
    outputs: dict[str, Any]
    checkpoint_data: Any = None
    locks: list[LeaseGrant] = field(default_factory=list)
    approval: GateVerdict | None = None
    # Raises when the approval no longer holds for the latest version (the executor supplies
    # the gate's check): an approved step acts only while it does.
    approval_guard: Callable[[], None] | None = None
    deadline_seconds: float = 300.0
    started_from: dict[str, Any] | None = None  # its inputs (runs.transitions.started_from)
    deadlock_policy: str = ""  # its workflow's, else its tenant's (core.deadlocks)
    backend_pid: int | None = None  # the PostgreSQL backend the body's queries run on
    timed_out: threading.Event = field(default_factory=threading.Event)
    _lost: threading.Event = field(default_factory=threading.Event)
    _grants_lock: threading.Lock = field(default_factory=threading.Lock)
    # An async body's effect mid-call, and a stop (its leases lost) that waits for its record.
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)
    _effect_running: bool = False
    _stop_deferred: bool = False
    # Governed calls (``tool``): how many this attempt made, the slots and locks they hold now
    # (renewed with the step's by its worker's heartbeat), and whether one parked the step.
    _calls: int = 0
    _beaten_at: float = 0.0  # time.monotonic() of the last heartbeat's database check
    _call_grants: list[LeaseGrant] = field(default_factory=list)
    parked: bool = False

    def stop_after_effect(self) -> bool:
        """The engine found the step's leases lost: True when an effect is mid-call, so the body
        is to stop once it is recorded (``AsyncStepContext.effect`` does), False to stop now."""
        with self._stop_lock:
            self._stop_deferred = self._effect_running
            return self._stop_deferred

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def step_key(self) -> str:
        return self.step.key

    @property
    def attempt(self) -> int:
        return self.step.attempt

    @property
    def correlation_id(self) -> str:
        return self.run.correlation_id

    def committed_effects(self, step_key: str) -> dict[str, Any]:
        """The recorded results of a step's committed effects, by kind (what a compensation
        undoes)."""
        rows = SideEffect.objects.filter(
            run_id=self.run.id, step__key=step_key, status=EffectStatus.COMMITTED
        ).order_by("committed_at", "id")
        return coordination.run(lambda: dict(rows.values_list("kind", "result")))

    def in_flight_effects(self, step_key: str) -> list[str]:
        """Kinds of a step's effects proposed with no outcome yet."""
        rows = SideEffect.objects.filter(run_id=self.run.id, step__key=step_key, status=EffectStatus.PROPOSED)
        return sorted(coordination.run(lambda: list(rows.values_list("kind", flat=True))))

    @property
    def environment(self) -> str:
        return self.run.environment

    def connection(self, provider: str) -> BoundConnection:
        """The ``provider`` connection this run bound when it started (its tenant's and its
        environment's, never another's). Raises ConnectionNotBound when it bound none."""
        bound = coordination.run(
            connection_for_run,
            tenant_id=self.run.tenant_id,
            environment=self.run.environment,
            binding=self.run.connections or {},
            provider=provider,
        )
        return replace(bound, run_id=self.run.id, correlation_id=self.run.correlation_id)

    @property
    def tenant_id(self) -> int:
        return self.run.tenant_id

    @property
    def approved_content(self) -> Any:
        """The content of the artifact version a human approved (gated steps only)."""
        if self.approval is None:
            raise RuntimeError(f"step {self.step_key} is not gated by an approval")
        return self.approval.content

    @property
    def token(self) -> int:
        """The fencing token of the step's lease."""
        return self.lease.token

    def grants(self) -> list[LeaseGrant]:
        with self._grants_lock:
            return [self.lease, *self.locks]

    def renew(self) -> None:
        """Renew every lease this step holds (raises StaleToken if one was lost), as the
        worker's heartbeat does: waiting for no row lock, so never in a cycle with the step's
        own stop (which locks its lease, then its others by id)."""
        renewed = leases_renew_many([(self.grants(), self.lease_seconds)])[0]
        self.renewed(renewed)
        if renewed is None:
            raise StaleToken(self.lease.key, self.lease.token)

    def renewed(self, grants: list[LeaseGrant] | None) -> None:
        """Take a renewal's outcome (this step's or its worker's heartbeat's): the step's grants
        renewed, or None when one was lost (its next ``ctx`` call raises LeaseLost)."""
        if grants is None:
            self._lost.set()
            return
        with self._grants_lock:  # by id and token: a lock taken since the renewal's read stays
            renewed = {(grant.id, grant.token): grant for grant in grants}
            self.lease = renewed.get((self.lease.id, self.lease.token), self.lease)
            self.locks = [renewed.get((grant.id, grant.token), grant) for grant in self.locks]

    def call_grants(self) -> list[LeaseGrant]:
        """The slots and locks the governed calls in progress hold (renewed apart from the
        step's own: a call ending between a renewal's read and its write loses nothing)."""
        with self._grants_lock:
            return list(self._call_grants)

    def call_grants_renewed(self, grants: list[LeaseGrant] | None) -> None:
        """A renewal's outcome for the calls' grants. None: one was no longer held — a call
        that ended meanwhile gave it back, or it was lost (then that call's proposal is
        refused: its guard fences every grant the call holds)."""
        if grants is None:
            return
        with self._grants_lock:  # by id and token: a lease row taken anew keeps its id
            renewed = {(grant.id, grant.token): grant for grant in grants}
            self._call_grants = [renewed.get((grant.id, grant.token), grant) for grant in self._call_grants]

    def _hold(self, grants: list[LeaseGrant]) -> None:
        with self._grants_lock:
            self._call_grants.extend(grants)

    def _let_go(self, grants: list[LeaseGrant]) -> None:
        ids = {grant.id for grant in grants}
        with self._grants_lock:
            self._call_grants = [grant for grant in self._call_grants if grant.id not in ids]

    def _next_call_key(self, key: str) -> str:
        if key.isdigit():
            raise ValueError(f"a call's key= may not be a number ({key!r}): calls without one are numbered")
        self._calls += 1
        return key or str(self._calls)

    def _held_keys(self) -> set[str]:
        return {grant.key for grant in self.grants()} | {grant.key for grant in self.call_grants()}

    def heartbeat(self) -> None:
        """Prove the step still owns its work; raise StepInterrupted if it does not."""
        coordination.run(self._heartbeat)

    def heartbeat_due(self) -> bool:
        """Between two looks for a slot under a tool's cap: whether to check with the database
        (``heartbeat``) now: once per heartbeat interval at most, and at once when the worker's
        heartbeat found a lease lost (the check says why: the run cancelled, or the lease taken
        over). Raises LeaseLost at once if the step timed out. A full heartbeat after each look,
        a read and a renewal's commit, cost more than the looks themselves once calls were
        woken as slots were given back (``runs.slot_waits``); the worker's own heartbeat renews
        the leases meanwhile."""
        if self.timed_out.is_set():
            raise LeaseLost(f"step {self.step_key} of {self.run_id} timed out")
        return self._lost.is_set() or time.monotonic() - self._beaten_at >= self.lease_seconds / 3

    def _heartbeat(self) -> None:
        self._beaten_at = time.monotonic()
        if self.timed_out.is_set():
            raise LeaseLost(f"step {self.step_key} of {self.run_id} timed out")
        # The run first: a cancel also revokes the leases, and says why they are gone.
        status = Run.objects.filter(pk=self.run.pk).values_list("status", flat=True).first()
        if status == RunStatus.CANCELLED and not self.step.compensates:  # compensations go on
            raise RunCancelled(f"run {self.run_id} was cancelled")
        if self._lost.is_set():
            raise LeaseLost(f"step {self.step_key} of {self.run_id} lost its lease")
        try:
            self.renew()
        except StaleToken:
            raise LeaseLost(f"step {self.step_key} of {self.run_id} lost its lease") from None

    def lock(self, *keys: str, policy: str = "wait", wait_timeout: float = 30.0) -> None:
        """Take entity locks for the rest of the step (released when it finishes). A wait that
        closes a cycle of waits (each holding a key the next one waits for) may be chosen to
        give way: LockDeadlock (core.deadlocks), and the step is retried by its policy."""
        grants = self._take_locks(
            keys, policy=policy, wait_timeout=wait_timeout, metadata=self._lock_metadata()
        )
        with self._grants_lock:
            self.locks.extend(grants)

    def _lock_metadata(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "step_id": self.step.pk, "step_key": self.step_key}

    def _waiting(self, keys: list[str] | tuple[str, ...], metadata: dict[str, Any]) -> WaitWatch:
        """The record of this step's wait for ``keys``, searched for cycles as it waits."""
        return WaitWatch(
            self.tenant_id,
            f"{self.run_id}:{self.step_key}",
            sorted(set(keys)),
            metadata,
            self.deadlock_policy,
        )

    def _take_locks(
        self, keys: list[str] | tuple[str, ...], *, policy: str, wait_timeout: float, metadata: dict[str, Any]
    ) -> list[LeaseGrant]:
        watch = self._waiting(keys, metadata)
        try:
            return locks_acquire(  # its attempts on a coordination thread, its waits here
                tenant_id=self.tenant_id,
                keys=keys,
                holder=f"{self.run_id}:{self.step_key}",
                ttl=self.lease_seconds,
                metadata=metadata,
                policy=policy,
                wait_timeout=wait_timeout,
                watch=watch,
            )
        finally:
            watch.end()

    def trace_headers(self) -> dict[str, str]:
        """The W3C ``traceparent`` (and ``tracestate``) of the span current here (inside an
        effect's call, the effect's), for an outgoing request to carry the run's trace on to
        the service it calls; empty when tracing is off."""
        return tracing.outgoing_headers()

    def effect(
        self,
        kind: str,
        fn: Callable[[], Any],
        *,
        request: dict[str, Any] | None = None,
        key: str = "",
        external_ref: Callable[[Any], str] | None = None,
    ) -> Any:
        """Run a side effect through the ledger; a retry gets the recorded result back."""
        self.heartbeat()
        outcome = effect_execute(
            run=self.run,
            step=self.step,
            kind=kind,
            fn=fn,
            request=request,
            idempotency_key=key,
            lease=self.lease,
            external_ref=external_ref,
            guard=self.approval_guard,
        )
        return outcome.result

    def tool(
        self,
        name: str,
        fn: Callable[[dict[str, Any]], Any],
        *,
        request: dict[str, Any] | None = None,
        locks: tuple[str, ...] | list[str] = (),
        approval: CallApproval = None,
        approval_policy: ApprovalPolicy | None = None,
        key: str = "",
        external_ref: Callable[[Any], str] | None = None,
        wait_timeout: float = 30.0,
    ) -> Any:
        """One governed tool call: ``fn(request)`` runs once, through the ledger, under the
        tool's caps (platform and tenant ``tool`` caps count calls in flight) and holding the
        entity ``locks`` for the length of the call. Its key (its place among the step's
        calls, or ``key``) is stable: a retry or a re-run of the step gets the recorded result
        back. ``approval`` (True, a policy, or a predicate of the request) parks the step until
        a human decides on the proposed request; on approval the step runs again from its start
        and this call sends the approved (possibly edited) request; on rejection it raises
        ``Rejected``."""
        self.heartbeat()
        call = self._call_open(name, request, locks, approval, approval_policy, key)
        if not isinstance(call, _Call):
            return call.result  # answered from its record
        try:
            fresh = sorted(set(locks) - self._held_keys())
            started = time.monotonic()
            if fresh:
                grants = self._take_locks(
                    fresh, policy="wait", wait_timeout=wait_timeout, metadata=self._call_metadata(call)
                )
                self._hold(grants)
                call.held += grants
                call.lock_wait_ms = (time.monotonic() - started) * 1000
            caps = {} if name == self.step.tool else coordination.run(tools.tool_caps, self.tenant_id, name)
            started, wait = time.monotonic(), _SlotWait()
            while True:
                seen = slots_released_so_far(name)
                slot = self._slot_try(call, caps)
                if slot is not False:
                    break
                slot_wait(name, seen, wait.next_delay())  # or until a call here gives one back
                if self.heartbeat_due():
                    self.heartbeat()
            if caps:
                call.cap_wait_ms = (time.monotonic() - started) * 1000
            outcome = effect_execute(
                run=self.run,
                step=self.step,
                kind=name,
                fn=lambda: fn(call.request),
                request=call.request,
                idempotency_key=tools.call_idempotency_key(self.run_id, self.step_key, call.record.key),
                lease=self.lease,
                external_ref=external_ref,
                guard=call.proposal_guard(),
            )
        except BaseException as exc:
            if (failure := _call_failure(exc)) is not None:
                self._call_ended(call, ToolCallStatus.FAILED, error=failure)
            else:
                self._call_interrupted(call)  # stopped from outside: its row is the next attempt's
            raise
        self._call_ended(call, ToolCallStatus.SUCCEEDED)
        return outcome.result

    def _call_open(
        self,
        name: str,
        request: dict[str, Any] | None,
        locks: tuple[str, ...] | list[str],
        approval: CallApproval,
        approval_policy: ApprovalPolicy | None,
        key: str,
    ) -> _Call | tools.Recorded:
        """The call recorded (or answered from its record), its approval asked where its policy
        wants one: parks the step (StepParked) or raises Rejected."""
        request = dict(request or {})
        opened = coordination.run(
            tools.call_open,
            run=self.run,
            step=self.step,
            call_key=self._next_call_key(key),
            tool=name,
            request=request,
            lock_keys=sorted(set(locks)),
        )
        if isinstance(opened, tools.Recorded):
            return opened
        policy = call_policy(approval, request, approval_policy)
        if policy is None:
            return _Call(opened, request, guard=self.approval_guard)
        verdict = coordination.run(
            tools.call_approval,
            run=self.run,
            step=self.step,
            lease=self.lease,
            grants=[*self.grants(), *self.call_grants()],
            call=opened,
            request=request,
            policy=policy,
            started_from=self.started_from,
        )
        return self._call_verdict(opened, name, verdict)

    def _call_verdict(self, record: Any, name: str, verdict: GateVerdict) -> _Call:
        if verdict.state == "waiting":
            self.parked = True
            raise StepParked(f"the {name} call waits for approval {verdict.approval_id}")
        if verdict.state == "rejected":
            raise Rejected(name, verdict.reason, verdict.approval_id)
        call_guard = tools.call_guard(self.step, record.key, verdict)
        step_guard = self.approval_guard  # a gated step's calls act only while its approval holds

        def guard() -> None:
            if step_guard is not None:
                step_guard()
            call_guard()

        return _Call(record, verdict.content, guard=guard)

    def _call_metadata(self, call: _Call) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step_id": self.step.pk,
            "step_key": self.step_key,
            "call": call.record.key,
        }

    def _slot_try(self, call: _Call, caps: dict[str, int]) -> LeaseGrant | None | bool:
        """A slot under ``caps`` (None: uncapped, the call just runs), or False: wait."""
        if not caps:
            coordination.run(tools.call_running, call.record, None)
            return None
        slot = coordination.run(
            tools.slot_try_take,
            call=call.record,
            caps=caps,
            holder=f"{self.run_id}:{self.step_key}",
            ttl=self.lease_seconds,
        )
        if slot is None:
            return False
        self._hold([slot])
        call.held.append(slot)
        return slot

    def _call_ended(self, call: _Call, status: str, error: str = "") -> None:
        try:
            coordination.run(
                tools.call_finish,
                call.record,
                status,
                idempotency_key=tools.call_idempotency_key(self.run_id, self.step_key, call.record.key),
                error=error,
                release=call.held,
                lock_wait_ms=call.lock_wait_ms,
                cap_wait_ms=call.cap_wait_ms,
            )
        except Exception:
            # Its end was not written (a dropped connection, say): its slot and locks given back
            # now if the database lets us, not held from every other call under the tool's caps
            # until their leases run out.
            self._call_interrupted(call)
            raise
        finally:
            self._let_go(call.held)

    def _call_interrupted(self, call: _Call) -> None:
        """Stopped from outside (a timeout, a lost lease, a cancel), or its end not written: give
        back what the call holds if the database lets us now; else its leases run out on their
        own."""
        try:
            coordination.run(tools.call_give_back, call.record, call.held)
        except Exception:  # the stop goes on; the leases expire
            logger.warning("the %s call's locks and slot were not released", call.record.tool, exc_info=True)
        finally:
            self._let_go(call.held)

    def checkpoint(self, data: Any) -> None:
        self.heartbeat()
        coordination.run(step_checkpoint, step=self.step, lease=self.lease, data=data)
        self.checkpoint_data = data


class AsyncStepContext:
    """Handed to an ``async def`` step body: the same step as ``StepContext`` with the same
    guarantees (ledger, fencing, leases), its calls awaitable. Its reads and writes of
    Runwarden's own tables run on the step's coordination thread, never on the event loop, so
    the body's awaits on models and tools interleave freely with them.

    ``await ctx.effect(kind, fn)``: ``fn()`` may return a value or an awaitable (``lambda:
    client.send(...)``); it is awaited between the ledger's proposal and its record, so a
    retry gets the recorded result instead of acting twice. A body cancelled mid-effect (its
    timeout, its run cancelled) leaves the effect proposed: ambiguous, for a reviewer.
    """

    def __init__(self, ctx: StepContext, coordinator: Executor | None) -> None:
        self.sync = ctx  # the synchronous context: its plain attributes are the same
        self._own = coordinator  # the step's own thread, where the process has no shared ones
        # A step's governed calls, one after the other (``asyncio.gather`` of several waits):
        # their places, their slots and their locks stay the step's own, in order.
        self._one_call_at_a_time = asyncio.Lock()

    async def _coordinate(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        shared = coordination.current()
        if shared is not None:  # a worker running many steps: its few coordination threads
            return await shared.call_async(fn, *args, **kwargs)
        assert self._own is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._own, partial(fn, *args, **kwargs))

    @property
    def run(self) -> Run:
        return self.sync.run

    @property
    def step(self) -> Step:
        return self.sync.step

    @property
    def run_id(self) -> str:
        return self.sync.run_id

    @property
    def step_key(self) -> str:
        return self.sync.step_key

    @property
    def attempt(self) -> int:
        return self.sync.attempt

    @property
    def correlation_id(self) -> str:
        return self.sync.correlation_id

    @property
    def environment(self) -> str:
        return self.sync.environment

    @property
    def tenant_id(self) -> int:
        return self.sync.tenant_id

    @property
    def input(self) -> dict[str, Any]:
        return self.sync.input

    @property
    def outputs(self) -> dict[str, Any]:
        return self.sync.outputs

    @property
    def checkpoint_data(self) -> Any:
        return self.sync.checkpoint_data

    @property
    def approved_content(self) -> Any:
        return self.sync.approved_content

    @property
    def token(self) -> int:
        return self.sync.token

    def trace_headers(self) -> dict[str, str]:
        return self.sync.trace_headers()  # the span current in this task: no database

    async def connection(self, provider: str) -> BoundConnection:
        return await self._coordinate(self.sync.connection, provider)

    async def committed_effects(self, step_key: str) -> dict[str, Any]:
        return await self._coordinate(self.sync.committed_effects, step_key)

    async def in_flight_effects(self, step_key: str) -> list[str]:
        return await self._coordinate(self.sync.in_flight_effects, step_key)

    async def heartbeat(self) -> None:
        await self._coordinate(self.sync.heartbeat)

    async def lock(self, *keys: str, policy: str = "wait", wait_timeout: float = 30.0) -> None:
        """Take entity locks for the rest of the step; a ``wait`` awaits between attempts (and
        may give way to a deadlock: ``StepContext.lock``)."""
        grants = await self._take_locks(
            keys, policy=policy, wait_timeout=wait_timeout, metadata=self.sync._lock_metadata()
        )
        with self.sync._grants_lock:
            self.sync.locks.extend(grants)

    async def _take_locks(
        self, keys: list[str] | tuple[str, ...], *, policy: str, wait_timeout: float, metadata: dict[str, Any]
    ) -> list[LeaseGrant]:
        wait, watch = LockWait(keys, wait_timeout), self.sync._waiting(keys, metadata)
        try:
            while True:
                grants = await self._coordinate(
                    locks_try_acquire,
                    tenant_id=self.tenant_id,
                    keys=keys,
                    holder=f"{self.run_id}:{self.step_key}",
                    ttl=self.sync.lease_seconds,
                    metadata=metadata,
                    policy=policy,
                )
                if grants is not None:
                    return grants
                delay = wait.next_delay()
                await self._coordinate(watch.check)
                await asyncio.sleep(delay)
        finally:
            if watch.waiter_id is not None:
                await asyncio.shield(self._coordinate(watch.end))

    async def tool(
        self,
        name: str,
        fn: Callable[[dict[str, Any]], Any],
        *,
        request: dict[str, Any] | None = None,
        locks: tuple[str, ...] | list[str] = (),
        approval: CallApproval = None,
        approval_policy: ApprovalPolicy | None = None,
        key: str = "",
        external_ref: Callable[[Any], str] | None = None,
        wait_timeout: float = 30.0,
    ) -> Any:
        """``StepContext.tool``, awaitable: ``fn(request)`` may return a value or an awaitable;
        the waits for locks and for a slot under the tool's cap are awaits, not a held thread."""
        async with self._one_call_at_a_time:
            return await self._tool(
                name, fn, request, locks, approval, approval_policy, key, external_ref, wait_timeout
            )

    async def _tool(
        self,
        name: str,
        fn: Callable[[dict[str, Any]], Any],
        request: dict[str, Any] | None,
        locks: tuple[str, ...] | list[str],
        approval: CallApproval,
        approval_policy: ApprovalPolicy | None,
        key: str,
        external_ref: Callable[[Any], str] | None,
        wait_timeout: float,
    ) -> Any:
        await self.heartbeat()
        sync = self.sync
        call = await self._coordinate(sync._call_open, name, request, locks, approval, approval_policy, key)
        if not isinstance(call, _Call):
            return call.result
        ended = False

        def end_succeeded() -> None:
            # Right after the effect's record, on the same coordination thread (one hop to and
            # from the event loop less while the call holds its slot). From here on a failure
            # is the call record's own, not the call's.
            nonlocal ended
            ended = True
            sync._call_ended(call, ToolCallStatus.SUCCEEDED)

        try:
            fresh = sorted(set(locks) - sync._held_keys())
            started = time.monotonic()
            if fresh:
                grants = await self._take_locks(
                    fresh, policy="wait", wait_timeout=wait_timeout, metadata=sync._call_metadata(call)
                )
                sync._hold(grants)
                call.held += grants
                call.lock_wait_ms = (time.monotonic() - started) * 1000
            caps = (
                {}
                if name == self.step.tool
                else await self._coordinate(tools.tool_caps, self.tenant_id, name)
            )
            started, wait = time.monotonic(), _SlotWait()
            while True:
                seen = slots_released_so_far(name)
                # To its end though cancelled: a slot it took is then in ``call.held``, released below.
                if await self._to_the_end(sync._slot_try, call, caps) is not False:
                    break
                await slot_wait_async(name, seen, wait.next_delay())  # or until one is given back here
                if sync.heartbeat_due():
                    await self.heartbeat()
            if caps:
                call.cap_wait_ms = (time.monotonic() - started) * 1000
            # Checked at the call's start, as the sync call is: another full heartbeat here
            # was a read and a renewal's commit more while the call held its slot.
            if sync.heartbeat_due():
                await self.heartbeat()
            result = await self._stop_deferred_during(
                self._effect(
                    name,
                    lambda: fn(call.request),
                    request=call.request,
                    key=tools.call_idempotency_key(self.run_id, self.step_key, call.record.key),
                    external_ref=external_ref,
                    guard=call.proposal_guard(),
                    then=end_succeeded,
                )
            )
        except BaseException as exc:
            if ended:  # its end was written and its slot and locks given back
                raise
            if (failure := _call_failure(exc)) is not None:
                await self._coordinate(sync._call_ended, call, ToolCallStatus.FAILED, failure)
            else:
                await asyncio.shield(self._coordinate(sync._call_interrupted, call))
            raise
        if not ended:  # answered from the ledger's record: nothing was recorded here
            await self._coordinate(sync._call_ended, call, ToolCallStatus.SUCCEEDED)
        return result

    async def checkpoint(self, data: Any) -> None:
        await self._coordinate(self.sync.checkpoint, data)

    async def effect(
        self,
        kind: str,
        fn: Callable[[], Any],
        *,
        request: dict[str, Any] | None = None,
        key: str = "",
        external_ref: Callable[[Any], str] | None = None,
        guard: Callable[[], None] | None = None,
    ) -> Any:
        """Run a side effect through the ledger; a retry gets the recorded result back.
        (``guard``: for a governed call, its approval's check instead of the step's.)

        A cancel never leaves the ledger guessing about what it knows: a claim or a record in
        progress finishes first; a claim whose call never started is recorded as not sent
        (unless the step timed out: its timeout already took the proposal to review); a lost
        lease (the run cancelled) stops the body only once the call in flight is recorded, as
        a plain body's would be."""
        await self.heartbeat()
        return await self._stop_deferred_during(
            self._effect(
                kind,
                fn,
                request=request,
                key=key,
                external_ref=external_ref,
                guard=guard or self.sync.approval_guard,
            )
        )

    async def _stop_deferred_during(self, effect: Awaitable[T]) -> T:
        """``effect`` (an ``_effect``) awaited with a stop that comes meanwhile deferred until it
        is recorded, then raised."""
        with self.sync._stop_lock:
            self.sync._effect_running = True
        try:
            outcome = await effect
        finally:
            with self.sync._stop_lock:
                self.sync._effect_running = False
                deferred, self.sync._stop_deferred = self.sync._stop_deferred, False
        if deferred:
            await self.heartbeat()  # raises RunCancelled or LeaseLost: the stop that waited
        return outcome

    async def _effect(
        self,
        kind: str,
        fn: Callable[[], Any],
        *,
        request: dict[str, Any] | None,
        key: str,
        external_ref: Callable[[Any], str] | None,
        guard: Callable[[], None] | None,
        then: Callable[[], None] | None = None,
    ) -> Any:
        """The effect through the ledger. ``then``: run right after a new result is recorded,
        on the same coordination thread (``_recorded_then``)."""
        with effect_span(kind) as span:
            claiming = asyncio.ensure_future(
                self._coordinate(
                    effect_claim,
                    run=self.run,
                    step=self.step,
                    kind=kind,
                    request=request,
                    idempotency_key=key,
                    lease=self.sync.lease,
                    external_ref=external_ref,
                    guard=guard,
                )
            )
            try:
                claimed = await asyncio.shield(claiming)
            except asyncio.CancelledError:
                await asyncio.wait([claiming])
                late = None if claiming.cancelled() or claiming.exception() else claiming.result()
                if isinstance(late, EffectClaim) and not self.sync.timed_out.is_set():
                    await self._to_the_end(
                        effect_settle_failed, late, EffectNotStarted("cancelled before it ran")
                    )
                raise
            effect_traced(span, claimed)
            if isinstance(claimed, EffectOutcome):
                return claimed.result
            try:
                with metrics.EFFECT_LATENCY_SECONDS.labels(kind=kind).time():
                    result = fn()
                    if inspect.isawaitable(result):
                        result = await result
            except INTERRUPTIONS:
                raise  # it may have happened: it stays proposed
            except Exception as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the call failed as it was being cancelled: it may have happened
                await self._to_the_end(effect_settle_failed, claimed, exc)
                raise
            outcome = await self._to_the_end(_recorded_then, claimed, result, then)
            effect_traced(span, outcome)
            return outcome.result

    async def _to_the_end(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """A coordination call that a cancel does not cut short: it finishes (its outcome
        recorded), and the cancel goes on after."""
        call = asyncio.ensure_future(self._coordinate(fn, *args, **kwargs))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call])
            raise


def _call_failure(exc: BaseException) -> str | None:
    """What a governed call that raised ``exc`` failed of (its row's error), or None where it
    was stopped from outside instead (a timeout, a lost lease, a cancel, the worker's own
    stop): then its row stays for the next attempt, which answers it from the ledger."""
    if isinstance(exc, INTERRUPTIONS) or not isinstance(exc, Exception):
        return None
    return f"{type(exc).__name__}: {exc}"


def _recorded_then(claim: EffectClaim, result: Any, then: Callable[[], None] | None) -> EffectOutcome:
    """``effect_settle`` (its own statement, committed), then ``then()`` where one is given."""
    outcome = effect_settle(claim, result)
    if then is not None:
        then()
    return outcome
