"""Reads of the runs app: runs for a user, run detail, live leases."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.db.models import Count, QuerySet
from django.utils import timezone

from core import rawsql, tracing
from core.deadlocks import waits_for_board
from core.leases import live_lease_sql, live_leases_filter
from core.models import Event, Lease, Tenant, User
from core.selectors import AnyUser, scope_to_user
from runs.definitions import LANES, REGISTRY
from runs.dispatch import load_room
from runs.explain import explain_ready
from runs.models import IN_A_SESSION, Run, SideEffect, Step, StepStatus, ToolCall
from runs.sessions import session_summary


def runs_for_user(
    user: AnyUser,
    *,
    status: str = "",
    workflow: str = "",
    correlation_id: str = "",
    tenant: str = "",
    session_key: str = "",
) -> QuerySet[Run]:
    runs = scope_to_user(Run.objects.select_related("tenant"), user)
    if status:
        runs = runs.filter(status=status)
    if workflow:
        runs = runs.filter(workflow=workflow)
    if correlation_id:
        runs = runs.filter(correlation_id=correlation_id)
    if tenant:
        runs = runs.filter(tenant__slug=tenant)
    if session_key:
        runs = runs.filter(IN_A_SESSION, session_key=session_key)
    return runs.order_by("-id")


CURSOR_SHAPE = RUN_ID_SHAPE = re.compile(r"run_[0-9A-Za-z]{1,60}")


def run_page(runs: QuerySet[Run], *, cursor: str = "", limit: int = 50) -> tuple[list[Run], str | None]:
    """Keyset pagination on the (time-sortable) run id, newest first. A cursor that is not a
    run id is a ValueError."""
    if cursor and not CURSOR_SHAPE.fullmatch(cursor):
        raise ValueError("the cursor is not one this list handed out")
    if cursor:
        runs = runs.filter(id__lt=cursor)
    page = list(runs[: limit + 1])
    next_cursor = page[limit - 1].id if len(page) > limit else None
    return page[:limit], next_cursor


def run_summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "tenant": run.tenant.slug,
        "workflow": run.workflow,
        "status": run.status,
        "actor": run.actor,
        "correlation_id": run.correlation_id,
        "trigger_event_id": run.trigger_event_id,
        "trace_id": tracing.trace_id_of(run.traceparent),
        "workflow_version": run.workflow_version,
        "environment": run.environment,
        "connections": {
            provider: str(bound.get("name", "")) for provider, bound in (run.connections or {}).items()
        },
        "session": session_summary(run),
        "replay_of": run.replay_of_id,
        "retries": run.retries,
        "compensation": run.compensation,
        "input": run.input,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


def step_detail(step: Step) -> dict[str, Any]:
    return {
        "id": step.pk,
        "key": step.key,
        "position": step.position,
        "lane": step.lane,
        "tool": step.tool,
        "status": step.status,
        "attempt": step.attempt,
        "lock_keys": step.lock_keys,
        "output": step.output,
        "error": step.error,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "created_at": step.created_at,
        "max_attempts": step.max_attempts,
    }


def effect_detail(effect: SideEffect) -> dict[str, Any]:
    return {
        "kind": effect.kind,
        "status": effect.status,
        "idempotency_key": effect.idempotency_key,
        "external_ref": effect.external_ref,
        "attempts": effect.attempts,
        "proposed_at": effect.proposed_at,
        "committed_at": effect.committed_at,
        "context": effect.context,
    }


def lease_detail(lease: Lease) -> dict[str, Any]:
    return {
        "key": lease.key,
        "tenant": lease.tenant.slug,
        "holder": lease.holder,
        "token": lease.token,
        "run_id": lease.metadata.get("run_id"),
        "acquired_at": lease.acquired_at,
        "renewed_at": lease.renewed_at,
        "expires_at": lease.expires_at,
    }


def tool_call_detail(call: ToolCall) -> dict[str, Any]:
    effect = call.effect
    return {
        "step": call.step.key,
        "key": call.key,
        "tool": call.tool,
        "status": call.status,
        "request": call.request,
        "lock_keys": call.lock_keys,
        "lock_wait_ms": call.lock_wait_ms,
        "cap_wait_ms": call.cap_wait_ms,
        "approval_id": call.approval_id,
        "idempotency_key": effect.idempotency_key if effect else "",
        "external_ref": effect.external_ref if effect else "",
        "error": call.error,
        "started_at": call.started_at,
        "finished_at": call.finished_at,
    }


def run_detail_as_started(run: Run, steps: list[Step]) -> dict[str, Any]:
    """A run just started, as its start wrote it (``steps`` with their ids): no effect and no
    lease yet. What ``POST /api/v1/runs`` answers with, without reading back what it wrote."""
    return {
        **run_summary(run),
        "steps": [step_detail(step) for step in steps],
        "effects": [],
        "tool_calls": [],
        "leases": [],
    }


def run_detail(run: Run) -> dict[str, Any]:
    """A run with its steps, effects, governed tool calls and live leases: what the API answers
    for a run (a GET, a duplicate start). Read with hand-written statements (``core.rawsql``):
    building the ORM's four queries took longer than PostgreSQL took to run them."""
    steps = [rawsql.from_row(Step, row) for row in rawsql.fetch_rows(_STEPS_SQL, [run.id])]
    effects = [rawsql.from_row(SideEffect, row) for row in rawsql.fetch_rows(_EFFECTS_SQL, [run.id])]
    return {
        **run_summary(run),
        "steps": [step_detail(step) for step in steps],
        "effects": [effect_detail(effect) for effect in effects],
        "tool_calls": [tool_call_detail(call) for call in _tool_calls(run)],
        "leases": [lease_detail(lease) for lease in _live_leases_of(run, steps)],
    }


_STEPS_SQL = (
    f"SELECT {rawsql.select_list(Step, 's')} FROM runs_step s WHERE s.run_id = %s ORDER BY s.position"
)
_EFFECTS_SQL = (
    f"SELECT {rawsql.select_list(SideEffect, 'e')} FROM runs_sideeffect e"
    " WHERE e.run_id = %s ORDER BY e.proposed_at, e.id"
)
_TOOL_CALLS_SQL = (
    f"SELECT {rawsql.select_list(ToolCall, 'c')}, {rawsql.select_list(Step, 's')},"
    f" {rawsql.select_list(SideEffect, 'e')} FROM runs_toolcall c"
    " JOIN runs_step s ON s.id = c.step_id LEFT JOIN runs_sideeffect e ON e.id = c.effect_id"
    " WHERE c.run_id = %s ORDER BY c.id"
)


def _tool_calls(run: Run) -> list[ToolCall]:
    """The run's governed tool calls in order, each with its step and its effect (if any)."""
    calls = []
    for row in rawsql.fetch_rows(_TOOL_CALLS_SQL, [run.id]):
        call, call.step, effect = rawsql.from_joined_row(row, ToolCall, Step, SideEffect)
        call.effect = None if call.effect_id is None else effect  # the left join's empty side
        calls.append(call)
    return calls


def _live_leases_of(run: Run, steps: list[Step]) -> list[Lease]:
    """The live leases the run holds: its steps' own and their entity locks, by key."""
    keys = [f"step:{step.pk}" for step in steps] + [key for step in steps for key in step.lock_keys]
    if not keys:
        return []
    among, key_params = rawsql.among(keys)
    sql = (
        f"SELECT {rawsql.select_list(Lease, 'l')}, {rawsql.select_list(Tenant, 't')} FROM core_lease l"
        f" JOIN core_tenant t ON t.id = l.tenant_id WHERE l.tenant_id = %s"
        f" AND l.key {among} AND {live_lease_sql('l')} ORDER BY l.key"
    )
    leases = []
    for row in rawsql.fetch_rows(sql, [run.tenant_id, *key_params, rawsql.adapt_datetime(timezone.now())]):
        lease, lease.tenant = rawsql.from_joined_row(row, Lease, Tenant)
        if lease.metadata.get("run_id") == run.id:  # a key another run holds now is not this run's
            leases.append(lease)
    return leases


_STEP_WITH_RUN_SQL = (
    f"SELECT {rawsql.select_list(Step, 's')}, {rawsql.select_list(Run, 'r')}"
    " FROM runs_step s JOIN runs_run r ON r.id = s.run_id WHERE s.id = %s"
)


def step_with_run(step_id: int) -> Step:
    """A step with its run (``Step.DoesNotExist`` if there is none), in one hand-written
    statement: what a decision on its approval reads."""
    rows = rawsql.fetch_rows(_STEP_WITH_RUN_SQL, [step_id])
    if not rows:
        raise Step.DoesNotExist(f"no step {step_id}")
    step, step.run = rawsql.from_joined_row(rows[0], Step, Run)
    return step


def live_leases_for_user(user: User) -> QuerySet[Lease]:
    return (
        scope_to_user(Lease.objects.filter(live_leases_filter()), user)
        .select_related("tenant")
        .order_by("tenant__slug", "key")
    )


def queue_depth_samples() -> list[tuple[dict[str, str], float]]:
    """Ready steps waiting for admission, by tenant and lane."""
    rows = (
        Step.objects.filter(status="ready")
        .values("tenant__slug", "lane")
        .annotate(n=Count("id"))
        .order_by("tenant__slug", "lane")
    )
    return [({"tenant": r["tenant__slug"], "lane": r["lane"]}, r["n"]) for r in rows]


def queue_depth_known() -> list[dict[str, str]]:
    """Every tenant's every lane: the gauge shows 0 where nothing waits."""
    slugs = Tenant.objects.order_by("slug").values_list("slug", flat=True)
    return [{"tenant": slug, "lane": lane} for slug in slugs for lane in LANES]


def inflight_samples() -> list[tuple[dict[str, str], float]]:
    """Admitted steps (leased or running), by workflow."""
    rows = (
        Step.objects.filter(status__in=["leased", "running"])
        .values("run__workflow")
        .annotate(n=Count("id"))
        .order_by("run__workflow")
    )
    return [({"workflow": r["run__workflow"]}, r["n"]) for r in rows]


def inflight_known() -> list[dict[str, str]]:
    """Every declared workflow: the gauge shows 0 where none of its steps is admitted."""
    return [{"workflow": key} for key in sorted(REGISTRY)]


STALE_WINDOW = timedelta(minutes=5)
BOARD_WAITERS_SCANNED = 2000


def ownership_board(user: User, *, tenant: str = "", prefix: str = "") -> list[dict[str, Any]]:
    """Who holds what in the user's tenants, one card per holder (``board_cards``). Per key
    held: the holder (run, step, worker, fencing token, acquired, expiry) and the queue of
    waiters in admission order (FIFO per key: step id), each with how long it has waited and
    why it is not admitted. Leases past expiry that nobody released (their holder died; anyone
    may take them over) are listed too, marked stale."""
    now = timezone.now()
    leases = scope_to_user(
        Lease.objects.filter(released_at__isnull=True, expires_at__gt=now - STALE_WINDOW), user
    )
    if tenant:
        leases = leases.filter(tenant__slug=tenant)
    if prefix:
        leases = leases.filter(key__startswith=prefix)
    leases_list = list(leases.select_related("tenant").order_by("tenant__slug", "key")[:500])
    step_ids = {lease.metadata.get("step_id") for lease in leases_list}
    holders = {s.pk: s for s in Step.objects.filter(pk__in=[i for i in step_ids if isinstance(i, int)])}
    held_keys = {(lease.tenant_id, lease.key) for lease in leases_list if not lease.key.startswith("step:")}
    candidates = (
        scope_to_user(Step.objects.filter(status=StepStatus.READY), user)
        .exclude(lock_keys=[])
        .select_related("run")
        .order_by("pk")[:BOARD_WAITERS_SCANNED]
    )
    queued: dict[tuple[int, str], list[Step]] = {}
    for candidate in candidates:
        for key in candidate.lock_keys:
            if isinstance(key, str) and (candidate.tenant_id, key) in held_keys:
                queued.setdefault((candidate.tenant_id, key), []).append(candidate)
    waiting = [s for steps in queued.values() for s in steps]
    reasons = explain_ready(waiting, run_workflows={s.run_id: s.run.workflow for s in waiting}, now=now)
    rows = []
    for lease in leases_list:
        step = holders.get(lease.metadata.get("step_id"))
        run_id = lease.metadata.get("run_id")
        rows.append(
            {
                "key": lease.key,
                "tenant": lease.tenant.slug,
                "is_step": lease.key.startswith("step:"),
                # Lease metadata is free-form: link only what can be a run id.
                "run_id": run_id if isinstance(run_id, str) and RUN_ID_SHAPE.fullmatch(run_id) else None,
                "step_key": lease.metadata.get("step_key", ""),
                "worker": step.worker if step is not None and step.status == StepStatus.RUNNING else "",
                "step_status": step.status if step is not None else "",
                "holder": lease.holder,
                # The dispatcher names a holder after its run and step; show any other.
                "show_holder": lease.holder
                != f"{lease.metadata.get('run_id')}:{lease.metadata.get('step_key')}",
                "token": lease.token,
                "acquired_at": lease.acquired_at,
                "expires_at": lease.expires_at,
                "expires_in": round((lease.expires_at - now).total_seconds()),
                "stale": lease.expires_at <= now,
                "expired_ago": max(0, round((now - lease.expires_at).total_seconds())),
                "waiters": [
                    {
                        "run_id": w.run_id,
                        "step_key": w.key,
                        "position": n,
                        "waited_seconds": max(0, round((now - w.updated_at).total_seconds())),
                        "reason": reasons.get(w.pk),
                    }
                    for n, w in enumerate(queued.get((lease.tenant_id, lease.key), []), start=1)
                ],
            }
        )
    return board_cards(rows)


def board_cards(holds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The board's holds (one per lease, in key order) as one card per run: a running step's
    lease (``step:<id>``) beside the entity locks its run holds, rather than a card each. A
    lease no run holds (a holder outside the engine) is a card of its own. Cards come in the
    order of their first key; in a card, the entity locks come first, then the step lease."""
    cards: dict[tuple[str, str], dict[str, Any]] = {}
    for hold in holds:
        group = (hold["tenant"], hold["run_id"] or f"lease {hold['key']}")
        card = cards.get(group)
        if card is None:
            card = cards[group] = {
                "tenant": hold["tenant"],
                "run_id": hold["run_id"],
                "holder": hold["holder"],
                "step_keys": [],
                "worker": "",
                "step_status": "",
                "acquired_at": hold["acquired_at"],
                "stale": False,
                "holds": [],
            }
        card["holds"].append(hold)
        if hold["step_key"] and hold["step_key"] not in card["step_keys"]:
            card["step_keys"].append(hold["step_key"])
        card["worker"] = card["worker"] or hold["worker"]
        card["step_status"] = card["step_status"] or hold["step_status"]
        card["acquired_at"] = min(card["acquired_at"], hold["acquired_at"])
        card["stale"] = card["stale"] or hold["stale"]
    for card in cards.values():
        card["holds"].sort(key=lambda hold: hold["is_step"])  # stable: the locks in key order
        card["keys"] = " ".join(hold["key"] for hold in card["holds"])
    return list(cards.values())


def board_caps(user: User, *, tenant: str = "") -> list[dict[str, Any]]:
    """The caps of the user's tenants as admission counts them now: each tenant's own cap and
    its caps per workflow, lane and tool, with the live holders; a full one stands out."""
    tenants = Tenant.objects.filter(memberships__user=user)
    if tenant:
        tenants = tenants.filter(slug=tenant)
    slugs = dict(tenants.values_list("pk", "slug"))
    room = load_room(timezone.now())
    rows = []
    for scope in sorted(room.caps):
        kind, _, rest = scope.partition(":")
        if kind == "tenant" and int(rest) in slugs:
            tenant_id, label = int(rest), "all steps"
        elif kind.startswith("tenant_") and int(rest.split(":", 1)[0]) in slugs:
            tenant_id, name = int(rest.split(":", 1)[0]), rest.split(":", 1)[1]
            label = f"{kind.removeprefix('tenant_')} {name}"
        else:
            continue
        cap = room.cap(scope) or 0
        rows.append(
            {
                "tenant": slugs[tenant_id],
                "scope": label,
                "held": room.held[scope],
                "cap": cap,
                "full": room.held[scope] >= cap,
            }
        )
    return rows


DEADLOCKS_SHOWN = 10


def board_waits(user: User, *, tenant: str = "") -> dict[str, Any]:
    """The mid-step lock waits of the user's tenants (who waits for which key, held by whom,
    for how long; a wait chosen to break a cycle shows the cycle), and the last hour's
    deadlocks: the ownership board's view of waits that admission does not see."""
    tenants = Tenant.objects.filter(memberships__user=user)
    if tenant:
        tenants = tenants.filter(slug=tenant)
    tenant_ids = list(tenants.values_list("pk", flat=True))
    deadlocks = Event.objects.filter(
        tenant_id__in=tenant_ids,
        verb="deadlock_detected",
        created_at__gte=timezone.now() - timedelta(hours=1),
    ).order_by("-id")
    return {
        "waits": waits_for_board(tenant_ids),
        "deadlocks": [
            {"at": event.created_at, "subject": event.subject, **event.payload}
            for event in deadlocks[:DEADLOCKS_SHOWN]
        ],
    }
