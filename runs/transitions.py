"""Step and run state transitions: one function per transition, the only code that moves a
step's or a run's status.

Every transition is a conditional UPDATE on the status it leaves (``from_statuses``), so two
racing callers (a timeout and a human, a reaper and a late worker) move a row exactly once;
the loser sees ``False``. Each appends its event in the caller's transaction and, when it
frees capacity or readies work, wakes the dispatcher once that transaction commits.

Transitions that end an admission (succeed, fail or retry, park, conflict) must run inside a
transaction that holds the step's fence (``core.leases.fenced_write``), so a worker that lost
its lease can never move the step; they release the admission's leases in that transaction.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Case, Exists, F, OuterRef, Q, Value, When
from django.utils import timezone

from core import rawsql
from core import services as core_services
from core.access import member_role_check
from core.direct_admission import admit_on_commit
from core.leases import (
    LEASE_GRANT_COLUMNS,
    Fence,
    LeaseGrant,
    StaleToken,
    lease_take_over_sql,
    leases_release,
    leases_renew,
    live_lease_sql,
    live_leases_filter,
    owned_sql,
)
from core.models import Event, Lease, Role, User
from core.validation import fingerprint
from core.wakeups import wake_on_commit
from runs import gates
from runs.definitions import (
    COMPENSATE_PREFIX,
    COMPENSATION_ATTEMPTS,
    UnknownWorkflow,
    WorkflowDefinitionError,
    get_workflow,
)
from runs.locking import run_steps_lock
from runs.models import EffectStatus, Run, RunStatus, SessionState, SideEffect, Step, StepStatus

UNFINISHED_RUN_STATUSES = (
    RunStatus.PENDING,
    RunStatus.RUNNING,
    RunStatus.WAITING_APPROVAL,
    RunStatus.CONFLICT,
)
ADMITTED = (StepStatus.LEASED, StepStatus.RUNNING)
LIVE_STEP_STATUSES = (
    StepStatus.PENDING,
    StepStatus.READY,
    StepStatus.LEASED,
    StepStatus.RUNNING,
    StepStatus.WAITING_APPROVAL,
    StepStatus.CONFLICT,
)
MAX_LOCK_KEY_LENGTH = 200


def _event(
    step: Step, verb: str, actor: str, *, prelude_sql: tuple[str, Sequence[Any]] = ("", ()), **payload: Any
) -> None:
    core_services.event_record(
        tenant=step.tenant_id,
        subject=f"run:{step.run_id}",
        verb=verb,
        actor=actor,
        payload={"step": step.key, **payload},
        prelude_sql=prelude_sql,
    )


def _event_select_sql(
    step: Step, verb_sql: str, actor: str, **payload: Any
) -> tuple[str, list[Any], Callable[[int, str], Event]]:
    """``_event`` as ``INSERT ... SELECT`` for a statement's CTE (``event_insert_select_sql``)."""
    return core_services.event_insert_select_sql(
        tenant=step.tenant_id,
        subject=f"run:{step.run_id}",
        verb_sql=verb_sql,
        actor=actor,
        payload={"step": step.key, **payload},
    )


def admission_grants(step: Step) -> list[LeaseGrant]:
    """The leases a step's current admission holds (its step lease, then its entity locks),
    as recorded when it was admitted; empty for a step that is not admitted."""
    if step.lease_id is None or step.lease_token is None or step.status not in ADMITTED:
        return []
    now = timezone.now()
    grants = [LeaseGrant(step.lease_id, step.tenant_id, f"step:{step.pk}", step.lease_token, now, now)]
    grants += [
        LeaseGrant(int(lock["id"]), step.tenant_id, str(lock["key"]), int(lock["token"]), now, now)
        for lock in step.lock_leases
    ]
    return grants


def valid_lock_key(key: object) -> bool:
    """A key a lease can carry: a short string without NUL, never a step's own ``step:`` key."""
    return (
        isinstance(key, str)
        and 0 < len(key) <= MAX_LOCK_KEY_LENGTH
        and "\x00" not in key
        and not key.startswith("step:")
    )


def step_lock_keys(
    *, workflow: str, step_key: str, context: Mapping[str, Any], version: str = ""
) -> list[str]:
    """A step's entity lock keys, filled from ``context`` (the run input and earlier outputs).

    Raises WorkflowDefinitionError (or UnknownWorkflow) with a reason a user can act on: a
    template that cannot be filled, or a key no lease can carry.
    """
    keys = get_workflow(workflow, version).spec(step_key).lock_keys(context)
    for key in keys:
        if not valid_lock_key(key):
            raise WorkflowDefinitionError(
                f"lock key {key[:60]!r}… of step {step_key!r} is not a valid key "
                f"(at most {MAX_LOCK_KEY_LENGTH} characters, no NUL, not starting with 'step:')"
            )
    return keys


def lock_context(run: Run, outputs: Mapping[str, Any]) -> dict[str, Any]:
    """What lock templates are filled from: earlier outputs (dicts), then the run input."""
    context: dict[str, Any] = {}
    for output in outputs.values():
        if isinstance(output, dict):
            context.update(output)
    context.update(run.input)
    return context


def session_release() -> Case:
    """The session state of a run as it finishes, in the statement that finishes it: an active
    run frees its place (the dispatcher, woken by the release, promotes the next one); a
    waiting one leaves the queue."""
    return Case(
        When(session_state=SessionState.ACTIVE, then=Value(SessionState.DONE)),
        When(session_state=SessionState.WAITING, then=Value(SessionState.DROPPED)),
        default=F("session_state"),
    )


# The same rule for hand-written SQL.
SESSION_RELEASE_SQL = (
    f"CASE session_state WHEN '{SessionState.ACTIVE.value}' THEN '{SessionState.DONE.value}'"
    f" WHEN '{SessionState.WAITING.value}' THEN '{SessionState.DROPPED.value}' ELSE session_state END"
)


def run_fail(*, run_id: str, now: datetime) -> bool:
    return (
        Run.objects.filter(pk=run_id, status__in=UNFINISHED_RUN_STATUSES).update(
            status=RunStatus.FAILED, session_state=session_release(), finished_at=now, updated_at=now
        )
        == 1
    )


def compensation_start(*, run_id: str, now: datetime) -> bool:
    """After a run failed or was cancelled: for each step that committed effects and declares a
    compensation, newest first, append a ``compensate:<key>`` step (the first ready, the others
    pending, so they run one after another in reverse order). Once per run: a conditional
    update on ``Run.compensation`` and the unique (run, key) constraint make sure of it. False
    when there is nothing to compensate."""
    run = Run.objects.filter(pk=run_id).only("workflow", "workflow_version", "tenant_id").first()
    if run is None:
        return False
    try:
        definition = get_workflow(run.workflow, run.workflow_version)
    except UnknownWorkflow:
        return False  # the run already failed for this very reason; nothing declares a compensation
    compensable = [spec.key for spec in definition.steps if spec.compensate is not None]
    if not compensable:
        return False
    # Effects still in flight count too: the compensation waits for their outcome (see
    # definitions._run_compensation), so an effect that commits after a cancel is still undone.
    committed = set(
        SideEffect.objects.filter(
            run_id=run_id,
            status__in=[EffectStatus.COMMITTED, EffectStatus.PROPOSED],
            step__key__in=compensable,
        )
        .values_list("step__key", flat=True)
        .distinct()
    )
    undo = list(Step.objects.filter(run_id=run_id, key__in=committed, compensates="").order_by("-position"))
    # The run keeps its session place until its compensations are done (whole run after whole run).
    held = Case(
        When(session_state=SessionState.DONE, then=Value(SessionState.ACTIVE)), default=F("session_state")
    )
    if not undo or not Run.objects.filter(pk=run_id, compensation="").update(
        compensation="running", session_state=held
    ):
        return False
    last = (
        Step.objects.filter(run_id=run_id).order_by("-position").values_list("position", flat=True).first()
        or 0
    )
    Step.objects.bulk_create(
        Step(
            run_id=run_id,
            tenant_id=run.tenant_id,
            key=COMPENSATE_PREFIX + step.key,
            compensates=step.key,
            position=last + 1 + index,
            lane=step.lane,
            tool=step.tool,
            lock_keys=step.lock_keys,
            max_attempts=COMPENSATION_ATTEMPTS,
            status=StepStatus.READY if index == 0 else StepStatus.PENDING,
        )
        for index, step in enumerate(undo)
    )
    core_services.event_record(
        tenant=run.tenant_id,
        subject=f"run:{run_id}",
        verb="compensation_started",
        actor="executor",
        payload={"steps": [COMPENSATE_PREFIX + step.key for step in undo]},
    )
    wake_on_commit()
    return True


def step_fail(
    *,
    step: Step,
    actor: str,
    reason: str,
    from_statuses: Sequence[str],
    grants: Sequence[LeaseGrant] = (),
    now: datetime | None = None,
) -> bool:
    """Fail a step and its run, once (a last attempt, a rejection, a step that cannot be
    admitted or executed because of its own data or definition, a reviewer's cancel). A
    compensation step is never just failed: it waits in ``conflict`` for a reviewer."""
    now = now or timezone.now()
    if step.compensates:
        return compensation_conflict(
            step=step, reason=reason, from_statuses=from_statuses, grants=grants, now=now
        )
    failed = Step.objects.filter(pk=step.pk, status__in=list(from_statuses)).update(
        status=StepStatus.FAILED, error=reason, finished_at=now, updated_at=now
    )
    if failed != 1:
        return False
    run_failed = run_fail(run_id=step.run_id, now=now)
    leases_release(grants, now=now)
    _event(step, "run_failed", actor, attempt=step.attempt, error=reason[:500], reason=reason[:500])
    if run_failed:
        compensation_start(run_id=step.run_id, now=now)
    wake_on_commit(only_if_waiting=True)
    return True


def step_retry_or_fail(
    *,
    step: Step,
    actor: str,
    error: str,
    retryable: bool,
    backoff: float,
    grants: Sequence[LeaseGrant],
    now: datetime | None = None,
) -> bool:
    """End a running attempt that raised: back to ready after ``backoff`` seconds (same step,
    same idempotency keys) while attempts remain, else fail the run. True when retrying."""
    now = now or timezone.now()
    if not retryable or step.attempt >= step.max_attempts:
        step_fail(step=step, actor=actor, reason=error, from_statuses=ADMITTED, grants=grants, now=now)
        return False
    moved = Step.objects.filter(pk=step.pk, status__in=ADMITTED).update(
        status=StepStatus.READY,
        error=error,
        available_at=now + timedelta(seconds=backoff),
        updated_at=now,
    )
    if moved == 1:
        leases_release(grants, now=now)
        _event(step, "step_retry_scheduled", actor, attempt=step.attempt, error=error[:500])
        wake_on_commit()
    return moved == 1


def step_succeed(
    *,
    step: Step,
    run: Run,
    output: Any,
    outputs: Mapping[str, Any],
    grants: Sequence[LeaseGrant],
    wake_for_next: bool = True,
    fence: Fence | None = None,
) -> tuple[str, int | None]:
    """Record a step's output and ready the next step (its lock keys resolved now), or finish
    the run. Returns (``succeeded``, the readied next step's id or None), or (``failed``,
    None) when the next step cannot be readied (its workflow is gone, or its lock template
    does not fit this run's data). ``wake_for_next=False``: the caller admits the next step
    itself (or wakes the dispatcher when it cannot), holding the admission lock, and wakes it
    for the room a run's last step frees (``executor._wake_for_freed_room``). ``fence``: the
    transaction's fence, if the step's output is its first write (it may carry the fence)."""
    now = timezone.now()
    if fence is not None and fence.deferred and rawsql.on_postgresql() and grants and not step.compensates:
        # The fence, the output, the leases released, and the run's end or the step's event:
        # one round trip.
        recorded, following = _step_record_success_fenced(step, run, output, grants, now, fence)
        evented = True
    else:
        if fence is not None:
            fence.check()
        recorded, following = _step_record_success(step, output, grants, now)
        evented = False
    if not recorded:  # cancelled, timed out or reaped while it ran: its result is refused
        raise StaleToken(f"step:{step.pk}", step.lease_token or 0)
    if step.compensates:
        _event(step, "step_succeeded", f"step:{step.key}", attempt=step.attempt)
        return "succeeded", _compensation_next(step, now)
    if following is None:
        if not evented:  # the run's end and its event in one round trip
            _event(
                step,
                "run_succeeded",
                f"step:{step.key}",
                attempt=step.attempt,
                prelude_sql=_run_succeed(run.pk, now),
            )
        if wake_for_next:
            wake_on_commit(only_if_waiting=True)
        return "succeeded", None
    next_id, next_key = following
    if not evented:
        _event(step, "step_succeeded", f"step:{step.key}", attempt=step.attempt)
    try:
        keys = step_lock_keys(
            workflow=run.workflow,
            version=run.workflow_version,
            step_key=next_key,
            context=lock_context(run, {**outputs, step.key: output}),
        )
    except (UnknownWorkflow, WorkflowDefinitionError) as exc:
        nxt = Step.objects.get(pk=next_id)
        step_fail(step=nxt, actor="executor", reason=str(exc), from_statuses=[StepStatus.PENDING], now=now)
        return "failed", None
    Step.objects.filter(pk=next_id, status=StepStatus.PENDING).update(
        status=StepStatus.READY, lock_keys=keys, available_at=None, updated_at=now
    )
    if wake_for_next:
        wake_on_commit()
    elif len(grants) > 1:  # its entity locks were released: a run waiting for one may go now
        wake_on_commit(only_if_waiting=True, admission_locked=True)
    return "succeeded", next_id


# A step's success: its output recorded (only while it is running; ``{fenced}`` may add a
# condition), its leases released (only when it was).
_STEP_SUCCEEDED_CTES = (
    f"done AS (UPDATE runs_step SET status = '{StepStatus.SUCCEEDED.value}', output = %s, error = '',"
    f" finished_at = %s, updated_at = %s WHERE id = %s AND status = '{StepStatus.RUNNING.value}'{{fenced}}"
    " RETURNING id),"
    " released AS (UPDATE core_lease SET released_at = %s"
    " WHERE {owned} AND released_at IS NULL AND EXISTS (SELECT 1 FROM done) RETURNING id)"
)
# The same as one statement, the run's next step looked up.
_SUCCESS_SQL = (
    f"WITH {_STEP_SUCCEEDED_CTES}"
    " SELECT (SELECT count(*) FROM done), nxt.id, nxt.key FROM (SELECT 1) AS one"
    " LEFT JOIN (SELECT id, key FROM runs_step WHERE run_id = %s AND position = %s) AS nxt ON true"
)
# A run's end (running → succeeded, its session place freed as ``session_release`` says).
_RUN_SUCCEEDED_SET = (
    f"status = '{RunStatus.SUCCEEDED.value}', finished_at = %s, updated_at = %s,"
    f" session_state = {SESSION_RELEASE_SQL}"
)


def _step_record_success(
    step: Step, output: Any, grants: Sequence[LeaseGrant], now: datetime
) -> tuple[bool, tuple[int, str] | None]:
    """running → succeeded with its output, its leases released; whether it was recorded, and
    the run's next step (id, key) if it has one."""
    if not rawsql.on_postgresql() or not grants:
        recorded = Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING).update(
            status=StepStatus.SUCCEEDED, output=output, error="", finished_at=now, updated_at=now
        )
        if recorded != 1:
            return False, None
        leases_release(grants, now=now)
        return True, (
            Step.objects.filter(run_id=step.run_id, position=step.position + 1)
            .values_list("pk", "key")
            .first()
        )
    owned, owned_params = owned_sql(grants)
    at = rawsql.adapt_datetime(now)
    params = [rawsql.adapt_json(Step, "output", output), at, at, step.pk, at, *owned_params]
    params += [step.run_id, step.position + 1]
    with connection.cursor() as cursor:
        rawsql.execute_prepared(cursor, _SUCCESS_SQL.format(fenced="", owned=owned), params)
        recorded, next_id, next_key = cursor.fetchone()
    if not recorded:
        return False, None
    return True, (None if next_id is None else (next_id, next_key))


# ``_SUCCESS_SQL`` carrying the transaction's fence (``core.leases.Fence``), every change
# depending on it, and the step's event with it: ``run_succeeded`` and the run's end when the
# run has no next step, else ``step_succeeded``. Row locks in the order every writer takes
# them: the fence's lease rows first (the step's, then its entity locks' by id; every change
# depends on them), the run's row last (``ended`` is read by nothing, so PostgreSQL runs it
# after the rest; ``released`` is read — its count, otherwise unused — so that it runs before).
_FENCED_SUCCESS_SQL = (
    "WITH {fence},"
    f" {_STEP_SUCCEEDED_CTES},"
    " nxt AS (SELECT id, key FROM runs_step WHERE run_id = %s AND position = %s),"
    f" ended AS (UPDATE runs_run SET {_RUN_SUCCEEDED_SET}"
    f" WHERE id = %s AND status = '{RunStatus.RUNNING.value}'"
    " AND EXISTS (SELECT 1 FROM done) AND NOT EXISTS (SELECT 1 FROM nxt) RETURNING id),"
    " event AS ({event} WHERE EXISTS (SELECT 1 FROM done) RETURNING id)"
    " SELECT {held}, (SELECT count(*) FROM done), nxt.id, nxt.key,"
    " (SELECT count(*) FROM released), (SELECT id FROM event)"
    " FROM (SELECT 1) AS one LEFT JOIN nxt ON true"
)
_SUCCESS_VERB_SQL = "CASE WHEN EXISTS (SELECT 1 FROM nxt) THEN 'step_succeeded' ELSE 'run_succeeded' END"


def _step_record_success_fenced(
    step: Step, run: Run, output: Any, grants: Sequence[LeaseGrant], now: datetime, fence: Fence
) -> tuple[bool, tuple[int, str] | None]:
    """``_step_record_success`` carrying ``fence`` (StaleToken if it no longer holds), the
    run's end when it has no next step, and the step's event (PostgreSQL)."""
    carried = fence.in_write()
    owned, owned_params = owned_sql(grants)
    actor = f"step:{step.key}"
    event, event_params, built = _event_select_sql(step, _SUCCESS_VERB_SQL, actor, attempt=step.attempt)
    at = rawsql.adapt_datetime(now)
    params = [*carried.params, rawsql.adapt_json(Step, "output", output), at, at, step.pk, at, *owned_params]
    params += [step.run_id, step.position + 1, at, at, run.pk, *event_params]
    sql = _FENCED_SUCCESS_SQL.format(
        fence=carried.ctes, held=carried.held, fenced=f" AND {carried.held}", owned=owned, event=event
    )
    with connection.cursor() as cursor:
        rawsql.execute_prepared(cursor, sql, params, prelude_sql=carried.prelude)
        held, recorded, next_id, next_key, _, event_id = cursor.fetchone()
    fence.confirm(held)
    if not recorded:
        return False, None
    written = built(event_id, "run_succeeded" if next_id is None else "step_succeeded")
    transaction.on_commit(lambda: core_services.event_committed(written))
    return True, (None if next_id is None else (next_id, next_key))


def _run_succeed(run_id: str, now: datetime) -> tuple[str, list[Any]]:
    """The statement that moves a run running → succeeded and frees its session place (as
    ``session_release`` says), to send before its event."""
    at = rawsql.adapt_datetime(now)
    return (
        f"UPDATE runs_run SET {_RUN_SUCCEEDED_SET} WHERE id = %s AND status = '{RunStatus.RUNNING.value}'; ",
        [at, at, run_id],
    )


def compensation_conflict(
    *,
    step: Step,
    reason: str,
    from_statuses: Sequence[str],
    grants: Sequence[LeaseGrant] = (),
    now: datetime | None = None,
) -> bool:
    """A compensation that ran out of attempts (or cannot run): a reviewer decides — retry it,
    or mark it compensated by hand. Later compensations wait behind it."""
    now = now or timezone.now()
    return step_conflict(
        step=step,
        kind="compensation_failed",
        error=reason,
        grants=grants,
        from_statuses=from_statuses,
        now=now,
        current={"compensating": step.compensates, "attempt": step.attempt, "error": reason[:500]},
    )


def compensation_retry(*, step: Step, actor: str) -> bool:
    """A reviewer retries a compensation in conflict: a fresh attempt budget, ready again."""
    now = timezone.now()
    moved = Step.objects.filter(pk=step.pk, status=StepStatus.CONFLICT, compensates__gt="").update(
        status=StepStatus.READY,
        max_attempts=F("attempt") + COMPENSATION_ATTEMPTS,
        available_at=now,
        error="",
        updated_at=now,
    )
    if moved:
        Run.objects.filter(pk=step.run_id).update(compensation="running", updated_at=now)
        _event(step, "compensation_retried", actor)
        wake_on_commit()
    return moved == 1


def compensation_mark_done(*, step: Step, actor: str, note: str = "") -> bool:
    """A reviewer undid the step by hand: the compensation counts as done and the next one
    (if any) goes on."""
    now = timezone.now()
    moved = Step.objects.filter(pk=step.pk, status=StepStatus.CONFLICT, compensates__gt="").update(
        status=StepStatus.SUCCEEDED,
        output={"compensated_by_hand": actor, "note": note[:500]},
        finished_at=now,
        updated_at=now,
    )
    if moved:
        _event(step, "compensation_marked_done", actor, note=note[:500])
        _compensation_next(step, now)
    return moved == 1


def _compensation_next(step: Step, now: datetime) -> int | None:
    """After a compensation step: ready the next one, or record that compensation is done."""
    following = (
        Step.objects.filter(run_id=step.run_id, position=step.position + 1)
        .values_list("pk", flat=True)
        .first()
    )
    if following is None:
        Run.objects.filter(pk=step.run_id).update(
            compensation="done", session_state=session_release(), updated_at=now
        )
        _event(step, "compensation_finished", f"step:{step.key}")
        wake_on_commit(only_if_waiting=True)  # its session's next run may go now
        return None
    Step.objects.filter(pk=following, status=StepStatus.PENDING).update(
        status=StepStatus.READY, available_at=None, updated_at=now
    )
    wake_on_commit()
    return following


def step_park(
    *, step: Step, grants: Sequence[LeaseGrant], approval_id: int | None, mid_step: bool = False
) -> None:
    """A gated step without a valid approval waits, holding no lease, lock or capacity.
    ``mid_step``: a governed call inside its body asked for the approval; the attempt it
    parked is not counted (the step runs again from its start once decided, not as a retry)."""
    now = timezone.now()
    Step.objects.filter(pk=step.pk, status=StepStatus.RUNNING).update(
        status=StepStatus.WAITING_APPROVAL,
        updated_at=now,
        **({"attempt": F("attempt") - 1} if mid_step else {}),
    )
    Run.objects.filter(pk=step.run_id, status__in=[RunStatus.PENDING, RunStatus.RUNNING]).update(
        status=RunStatus.WAITING_APPROVAL, updated_at=now
    )
    leases_release(grants, now=now)
    _event(step, "step_waiting_approval", "executor", approval_id=approval_id)
    wake_on_commit(only_if_waiting=True)


def step_conflict(
    *,
    step: Step,
    kind: str,
    error: str,
    grants: Sequence[LeaseGrant] = (),
    from_statuses: Sequence[str] = ADMITTED,
    now: datetime | None = None,
    **details: Any,
) -> bool:
    """The step waits in ``conflict`` for a reviewer; a conflict artifact says why."""
    now = now or timezone.now()
    moved = Step.objects.filter(pk=step.pk, status__in=list(from_statuses)).update(
        status=StepStatus.CONFLICT, error=error, updated_at=now
    )
    if moved != 1:
        return False
    Run.objects.filter(pk=step.run_id, status__in=UNFINISHED_RUN_STATUSES).update(
        status=RunStatus.CONFLICT, updated_at=now
    )
    if step.compensates:  # the run's compensation waits for a reviewer
        Run.objects.filter(pk=step.run_id).update(compensation="failed", updated_at=now)
    leases_release(grants, now=now)
    effect = details.get("effect")
    _event(step, "step_conflict", "executor", kind=kind, effect=effect.idempotency_key if effect else None)
    gates.report_conflict(kind, step=step, error=error, **details)
    wake_on_commit(only_if_waiting=True)
    return True


def step_requeue(*, step: Step, actor: str, verb: str, now: datetime | None = None, **payload: Any) -> bool:
    """An admission that ended without a result (its lease expired before or while it ran, and
    no effect was in flight) goes back to ready. The attempt count is kept: a step that was
    never picked up has not used an attempt."""
    now = now or timezone.now()
    moved = Step.objects.filter(pk=step.pk, status__in=ADMITTED, lease_token=step.lease_token).update(
        status=StepStatus.READY, available_at=now, updated_at=now
    )
    if moved == 1:
        _event(step, verb, actor, attempt=step.attempt, token=step.lease_token, **payload)
        wake_on_commit()
    return moved == 1


def step_resume(
    *, step: Step, actor: str, from_statuses: tuple[str, ...] = (StepStatus.WAITING_APPROVAL,)
) -> bool:
    """Make a parked step ready again, once: two racing resumes (two approvals, an approval
    and a timeout) move it exactly once. Call in the deciding transaction."""
    now = timezone.now()
    verb = "step_resumed"
    if rawsql.on_postgresql():
        # The step, its event and its run in one statement: every approval resumes a step here.
        event, event_params, built = _event_select_sql(step, rawsql.sql_strings(verb), actor)
        at = rawsql.adapt_datetime(now)
        with connection.cursor() as cursor:
            rawsql.execute_prepared(
                cursor,
                _RESUME_SQL.format(from_statuses=rawsql.sql_strings(*from_statuses), event=event),
                [at, at, step.pk, *event_params, at, step.run_id],
            )
            moved, event_id = cursor.fetchone()
        if not moved:
            return False
        written = built(event_id, verb)
        transaction.on_commit(lambda: core_services.event_committed(written))
    else:  # SQLite runs one statement per call
        moved = Step.objects.filter(pk=step.pk, status__in=from_statuses).update(
            status=StepStatus.READY, available_at=now, error="", updated_at=now
        )
        if moved != 1:
            return False
        Run.objects.filter(pk=step.run_id, status__in=_RESUMED_RUN_FROM).update(
            status=RunStatus.RUNNING, updated_at=now
        )
        _event(step, verb, actor)
    if step.compensates:
        Run.objects.filter(pk=step.run_id, compensation="failed").update(
            compensation="running", updated_at=now
        )
    admit_on_commit(step.pk)  # straight to a worker where it fits, else a round
    return True


# The run statuses a resumed step takes its run back from to running.
_RESUMED_RUN_FROM = (RunStatus.WAITING_APPROVAL, RunStatus.CONFLICT)

# ``step_resume`` on PostgreSQL: the step back to ready, its event, then its run (the row
# locks in the order every writer takes them: the step's, the run's last; ``running`` is read
# by nothing, so PostgreSQL runs it after the rest).
_RESUME_SQL = (
    f"WITH moved AS (UPDATE runs_step SET status = '{StepStatus.READY.value}', available_at = %s,"
    " error = '', updated_at = %s WHERE id = %s AND status IN ({from_statuses}) RETURNING id),"
    " event AS ({event} WHERE EXISTS (SELECT 1 FROM moved) RETURNING id),"
    f" running AS (UPDATE runs_run SET status = '{RunStatus.RUNNING.value}', updated_at = %s"
    f" WHERE id = %s AND status IN ({rawsql.sql_strings(*_RESUMED_RUN_FROM)})"
    " AND EXISTS (SELECT 1 FROM moved))"
    " SELECT (SELECT count(*) FROM moved), (SELECT id FROM event)"
)


def started_from(run: Run, outputs: Mapping[str, Any]) -> dict[str, Any]:
    """What an attempt of a step starts from: the run's input and the earlier steps' outputs,
    as PostgreSQL's jsonb keeps them (a whole float is a number like an int there), so the
    outputs a worker holds and the ones read back hash the same. (A gated step's approved
    content is held by its approval's own guard.)"""
    return {"input": _as_stored(run.input), "outputs": _as_stored(dict(outputs))}


def _as_stored(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _as_stored(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_stored(item) for item in value]
    return value


def step_inputs_changed(step: Step, seen: dict[str, Any]) -> bool:
    """An earlier attempt of the step that did not succeed started from other inputs."""
    return bool(step.input_hash) and step.input_hash != fingerprint(seen)


def step_inputs_remember(step: Step, seen: dict[str, Any] | None) -> None:
    """Record what an attempt that did not succeed (it will run again) started from, the first
    time: a later attempt on different inputs is refused (``step_inputs_changed``). In the
    attempt's ending transaction; success records nothing (a succeeded step never runs again)."""
    if seen is not None and not step.input_hash:
        Step.objects.filter(pk=step.pk, input_hash="").update(input_hash=fingerprint(seen), started_from=seen)


def step_inputs_forget(*, step_ids: list[int], after: tuple[str, int, int] | None = None) -> None:
    """These steps (and, ``after``: a run's steps between two positions) run on their inputs as
    they are now: a reviewer said so, or the run was sent back on purpose."""
    steps = Q(pk__in=step_ids)
    if after is not None:
        run_id, first, last = after
        steps |= Q(run_id=run_id, position__gt=first, position__lt=last)
    Step.objects.filter(steps).exclude(input_hash="").update(input_hash="", started_from=None)


def run_rewind(*, step: Step, to_step_key: str, actor: str, note: str = "") -> bool:
    """Send a parked step's run back to an earlier step ("request changes" → redraft): that step
    is ready again and every step after it pending. Once, from ``waiting_approval`` only."""
    now = timezone.now()
    target = Step.objects.filter(run_id=step.run_id, key=to_step_key, position__lt=step.position).first()
    if target is None:
        raise ValueError(f"no earlier step {to_step_key!r} to send the run back to")
    moved = Step.objects.filter(pk=step.pk, status=StepStatus.WAITING_APPROVAL).update(
        status=StepStatus.PENDING, updated_at=now
    )
    if moved != 1:
        return False
    Step.objects.filter(run_id=step.run_id, position__gt=target.position, position__lt=step.position).update(
        status=StepStatus.PENDING, updated_at=now
    )
    Step.objects.filter(pk=target.pk).update(status=StepStatus.READY, available_at=now, updated_at=now)
    # Sent back on purpose: these steps start from new inputs, remembered afresh.
    step_inputs_forget(step_ids=[target.pk, step.pk], after=(step.run_id, target.position, step.position))
    Run.objects.filter(pk=step.run_id).update(status=RunStatus.RUNNING, updated_at=now)
    _event(step, "changes_requested", actor, back_to=to_step_key, note=note)
    wake_on_commit()
    return True


def run_cancel_in_transaction(
    *, run: Run, actor: str, reason: str = "cancelled", only_waiting: bool = False, by: User | None = None
) -> bool:
    """Cancel an unfinished run: waiting steps are cancelled, admitted ones are fenced out (their
    leases and locks are revoked now; they notice at their next heartbeat). False when the run
    had already finished — or, with ``only_waiting``, when it is no longer waiting for its
    session turn. ``by``: the person cancelling; PermissionDenied unless an operator of the run's
    tenant at that instant. Call inside a transaction."""
    now = timezone.now()
    run_steps_lock(run.pk)  # the anchor (runs/locking.py): every step row first
    if by is not None:
        member_role_check(by, run.tenant_id, [Role.OPERATOR], "cancelling this run")
    live_steps = list(Step.objects.filter(run=run, status__in=LIVE_STEP_STATUSES).order_by("pk"))
    still = Run.objects.filter(pk=run.pk, status__in=UNFINISHED_RUN_STATUSES)
    if only_waiting:
        still = still.filter(session_state=SessionState.WAITING)
    cancelled = still.update(
        status=RunStatus.CANCELLED, session_state=session_release(), finished_at=now, updated_at=now
    )
    if cancelled != 1:
        return False
    # Only what this run's admissions hold (step lease by key and token, entity locks by their
    # recorded leases): a step still waiting for an entity must not revoke its holder's lock.
    held = Q(pk__in=[])
    for step in live_steps:
        if step.lease_token is not None:
            held |= Q(key=f"step:{step.pk}", token=step.lease_token)
        for lock in step.lock_leases if step.status in ADMITTED else []:
            held |= Q(pk=int(lock["id"]), token=int(lock["token"]))
    Lease.objects.filter(held, live_leases_filter(now), tenant_id=run.tenant_id).update(
        expires_at=now, released_at=now
    )
    Step.objects.filter(pk__in=[step.pk for step in live_steps]).update(
        status=StepStatus.CANCELLED, error=reason, finished_at=now, updated_at=now
    )
    core_services.event_record(
        tenant=run.tenant_id,
        subject=f"run:{run.id}",
        verb="cancelled",
        actor=actor,
        payload={"reason": reason},
    )
    gates.withdraw_decisions(run_id=run.id, actor=actor, reason=reason)
    compensation_start(run_id=run.id, now=now)
    wake_on_commit(only_if_waiting=True)
    return True


_HOST = socket.gethostname()


def worker_id() -> str:
    """This process, as the board names a step's worker (read at each start: prefork children
    are forked after import)."""
    return f"{_HOST}:{os.getpid()}"


def step_attempt_started(*, step_id: int, token: int, now: datetime) -> bool:
    """leased → running for the worker holding ``token``: the attempt is counted here, when a
    worker really starts it, not at admission."""
    return (
        Step.objects.filter(pk=step_id, status=StepStatus.LEASED, lease_token=token).update(
            status=StepStatus.RUNNING,
            attempt=F("attempt") + 1,
            started_at=now,
            updated_at=now,
            worker=worker_id(),
        )
        == 1
    )


# What an attempt's start writes, in hand-written SQL (as ``step_attempt_started`` does): the
# step running, its attempt counted; its run running, if still pending (``started`` the CTE
# of the step's started row).
_ATTEMPT_STARTED_SET = (
    f"status = '{StepStatus.RUNNING.value}', attempt = runs_step.attempt + 1, started_at = %(now)s,"
    " worker = %(worker)s"
)


def _run_started_sql(started: str) -> str:
    return (
        f"UPDATE runs_run SET status = '{RunStatus.RUNNING.value}', started_at = %(now)s,"
        f" updated_at = %(now)s FROM {started} WHERE runs_run.id = {started}.run_id"
        f" AND runs_run.status = '{RunStatus.PENDING.value}' RETURNING runs_run.id"
    )


# The start of an attempt as one statement: the step (leased → running, its attempt counted),
# its run (pending → running), its step lease and entity locks renewed, and the step and run
# read back. Nothing is written unless every lease of the admission is still live (``alive``
# is read first); the counts tell the caller which. The writes take their row locks in the
# order every writer uses: step row, leases, run row.
_START_SQL = f"""
    WITH cur AS (
        SELECT lease_id, lease_token, lock_leases FROM runs_step
        WHERE id = %(step_id)s AND status = '{StepStatus.LEASED.value}' AND lease_token = %(token)s
    ), held AS (
        SELECT lease_id AS id, lease_token AS token FROM cur
        UNION ALL
        SELECT (g ->> 'id')::bigint, (g ->> 'token')::bigint FROM cur, jsonb_array_elements(cur.lock_leases) g
    ), alive AS (
        SELECT count(*) AS n FROM core_lease l
        WHERE l.id = ANY ((SELECT array_agg(id) FROM held)::bigint[])
        AND (l.id, l.token) IN (SELECT id, token FROM held)
        AND {{live}}
    ), s AS (
        UPDATE runs_step SET {_ATTEMPT_STARTED_SET}, updated_at = %(now)s
        WHERE id = %(step_id)s AND status = '{StepStatus.LEASED.value}' AND lease_token = %(token)s
        AND (SELECT n FROM alive) = (SELECT count(*) FROM held)
        RETURNING *
    ), renewed AS (
        UPDATE core_lease l SET renewed_at = %(now)s, expires_at = %(expires)s
        WHERE l.id = ANY ((SELECT array_agg(id) FROM held)::bigint[])
        AND (l.id, l.token) IN (SELECT id, token FROM held)
        AND {{live}}
        AND EXISTS (SELECT 1 FROM s)
        RETURNING l.id
    ), started AS ({_run_started_sql("s")})
    SELECT {{step}}, {{run}}, (SELECT count(*) FROM held), (SELECT n FROM alive),
           (SELECT count(*) FROM renewed), EXISTS (SELECT 1 FROM started)
    FROM (SELECT 1) AS one LEFT JOIN s ON true LEFT JOIN runs_run r ON r.id = s.run_id
"""


def step_attempt_start(
    *, step_id: int, token: int, now: datetime, ttl: float
) -> tuple[Step, Run, list[LeaseGrant]] | None:
    """leased → running for the worker holding ``token``, in the caller's transaction: the
    attempt counted (here, when a worker really starts it, not at admission), the run running,
    the step lease and entity locks renewed to ``ttl`` seconds from ``now``. Returns the step,
    its run and its grants; None when ``token`` holds no leased step (a duplicate delivery, a
    cancelled run, a reaped admission). Raises StaleToken when a lease ran out before pickup
    (the step is admitted anew); on PostgreSQL nothing has been written then, unless a lease
    was taken over in the instant between the check and the renewal (then the caller rolls
    back)."""
    expires = now + timedelta(seconds=ttl)
    if not rawsql.on_postgresql():
        if not step_attempt_started(step_id=step_id, token=token, now=now):
            return None
        step = Step.objects.select_related("run").get(pk=step_id)
        grants = leases_renew(grants=admission_grants(step), ttl=ttl, now=now)
        run = step.run
        if run.status == RunStatus.PENDING:
            Run.objects.filter(pk=run.pk, status=RunStatus.PENDING).update(
                status=RunStatus.RUNNING, started_at=now, updated_at=now
            )
            run.status, run.started_at, run.updated_at = RunStatus.RUNNING, now, now
        return step, run, grants
    sql = _START_SQL.format(
        step=rawsql.select_list(Step, "s"),
        run=rawsql.select_list(Run, "r"),
        live=live_lease_sql("l", "%(now)s"),
    )
    at = rawsql.adapt_datetime(now)
    params = {
        "now": at,
        "expires": rawsql.adapt_datetime(expires),
        "worker": worker_id(),
        "step_id": step_id,
        "token": token,
    }
    with connection.cursor() as cursor:
        rawsql.execute_prepared(cursor, sql, params)
        row = cursor.fetchone()
    held, alive, renewed, started = row[-4:]
    if row[0] is None:  # no step of that token is leased, or one of its leases ran out
        if held and alive < held:
            raise StaleToken(f"step:{step_id}", token)
        return None
    step = rawsql.from_row(Step, row)
    run = rawsql.from_row(Run, row, rawsql.width(Step))
    if renewed != held:
        raise StaleToken(f"step:{step_id}", token)
    return step, run, _started(step, run, now, expires, started)


def _started(step: Step, run: Run, now: datetime, expires: datetime, run_started: bool) -> list[LeaseGrant]:
    """A step just started, read back in the statement that started it: its run as that
    statement left it (``run_started``: it moved the run pending → running, which its own read
    of the run did not see yet), and the step's grants, running until ``expires``."""
    if run_started:
        run.status, run.started_at, run.updated_at = RunStatus.RUNNING, now, now
    step._state.fields_cache["run"] = run
    return [
        LeaseGrant(g.id, g.tenant_id, g.key, g.token, g.acquired_at, expires) for g in admission_grants(step)
    ]


def step_await_approval(*, step: Step, actor: str) -> bool:
    """A step held in ``conflict`` because an edit made its approval stale waits for a decision
    on the new version again (a reviewer kept the edit), once; its run waits with it. The step
    holds no lease in ``conflict`` and nothing becomes ready, so nothing is woken. Call in the
    deciding transaction."""
    now = timezone.now()
    moved = Step.objects.filter(pk=step.pk, status=StepStatus.CONFLICT).update(
        status=StepStatus.WAITING_APPROVAL, updated_at=now
    )
    if moved != 1:
        return False
    Run.objects.filter(pk=step.run_id, status=RunStatus.CONFLICT).update(
        status=RunStatus.WAITING_APPROVAL, updated_at=now
    )
    _event(step, "step_waiting_approval", actor)
    return True


def session_runs_promote(run_ids: list[str], now: datetime) -> None:
    """Waiting session runs whose turn it is (runs.sessions decides) go: ready the first
    unfinished step of each run, then mark the runs active (step rows
    before run rows; both conditional, so a run cancelled meanwhile stays cancelled)."""
    if not run_ids:
        return
    earlier_open = Step.objects.filter(run_id=OuterRef("run_id"), position__lt=OuterRef("position")).exclude(
        status=StepStatus.SUCCEEDED
    )
    Step.objects.filter(run_id__in=run_ids, status=StepStatus.PENDING).filter(~Exists(earlier_open)).update(
        status=StepStatus.READY, available_at=None, updated_at=now
    )
    Run.objects.filter(pk__in=run_ids, session_state=SessionState.WAITING).update(
        session_state=SessionState.ACTIVE, updated_at=now
    )
    # Only the runs this statement promoted (a cancel may have taken one meanwhile).
    promoted = Run.objects.filter(
        pk__in=run_ids, session_state=SessionState.ACTIVE, updated_at=now
    ).values_list("pk", "tenant_id", "session_key")
    for run_id, tenant_id, session_key in promoted:
        core_services.event_record(
            tenant=tenant_id,
            subject=f"run:{run_id}",
            verb="session_turn",
            actor="dispatcher",
            payload={"session_key": session_key},
        )


def session_runs_expire(due: list[tuple[str, int, str, datetime]], now: datetime) -> None:
    """Waiting session runs past their queue deadline (``(run_id, tenant_id, session_key,
    created_at)`` rows, found by runs.sessions) end ``expired``, their steps cancelled; a run a
    cancel took meanwhile stays cancelled."""
    ids = [row[0] for row in due]
    reason = "expired: waited longer than its session's queue timeout"
    Step.objects.filter(
        run_id__in=ids, status=StepStatus.PENDING, run__session_state=SessionState.WAITING
    ).update(status=StepStatus.CANCELLED, error=reason, finished_at=now, updated_at=now)
    Run.objects.filter(pk__in=ids, session_state=SessionState.WAITING).update(
        status=RunStatus.EXPIRED, session_state=SessionState.DROPPED, finished_at=now, updated_at=now
    )
    # Only the runs this statement expired (a cancel may have taken one meanwhile).
    expired = set(
        Run.objects.filter(pk__in=ids, status=RunStatus.EXPIRED, finished_at=now).values_list("pk", flat=True)
    )
    if expired:
        for run_id, tenant_id, session_key, created_at in (row for row in due if row[0] in expired):
            core_services.event_record(
                tenant=tenant_id,
                subject=f"run:{run_id}",
                verb="run_expired",
                actor="dispatcher",
                payload={
                    "session_key": session_key,
                    "reason": reason,
                    "waited_seconds": round((now - created_at).total_seconds(), 3),
                },
            )
        wake_on_commit()


RETRYABLE_RUN_STATUSES = (RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.EXPIRED)


def run_retry_from(
    *,
    run: Run,
    target: Step,
    lock_keys: list[str],
    budget: int,
    queue_deadline: datetime | None,
    actor: str,
    now: datetime,
) -> bool:
    """A failed, cancelled or expired run (not compensating) starts again from ``target``, its
    first unfinished step: the run pending (waiting its session's turn, if it has a session),
    ``target`` ready with ``budget`` more attempts and the steps after it pending. False when
    the run was in no state to retry. Call after the run's anchor (runs/locking.py)."""
    moved = Run.objects.filter(pk=run.pk, status__in=RETRYABLE_RUN_STATUSES, compensation="").update(
        status=RunStatus.PENDING,
        session_state=SessionState.WAITING if run.session_key else SessionState.NONE,
        queue_deadline=queue_deadline,
        retries=F("retries") + 1,
        finished_at=None,
        updated_at=now,
    )
    if moved != 1:
        return False
    fresh: dict[str, Any] = {
        "error": "",
        "finished_at": None,
        "lease_id": None,
        "lease_token": None,
        "lock_leases": [],
    }
    Step.objects.filter(run=run, position__gt=target.position).update(
        status=StepStatus.PENDING, lock_keys=[], updated_at=now, **fresh
    )
    Step.objects.filter(pk=target.pk).update(
        retried_at=now,
        status=StepStatus.PENDING if run.session_key else StepStatus.READY,
        lock_keys=lock_keys,
        max_attempts=target.attempt + budget,
        available_at=None,
        updated_at=now,
        **fresh,
    )
    core_services.event_record(
        tenant=run.tenant_id,
        subject=f"run:{run.id}",
        verb="run_retried",
        actor=actor,
        payload={"from_step": target.key, "was": run.status, "attempt": target.attempt + 1},
    )
    wake_on_commit()
    return True


@dataclass(frozen=True)
class LeasedStep:
    """An admitted step's grants: its own lease and its entity locks' leases."""

    step_id: int
    lease: LeaseGrant
    locks: list[LeaseGrant]


def steps_lease(leased: Sequence[LeasedStep], *, now: datetime) -> None:
    """ready → leased for an admission round's steps, in one statement. The round locked their
    rows while they were ready (``runs.locking.ready_steps_lock``, in this transaction) and
    granted their leases; a step records its grants so its worker can renew and release them."""
    if not leased:
        return
    if not rawsql.on_postgresql():
        rows = [
            Step(
                pk=step.step_id,
                status=StepStatus.LEASED,
                lease_id=step.lease.id,
                lease_token=step.lease.token,
                lock_leases=_lock_leases(step),
                enqueued_at=now,
                updated_at=now,
            )
            for step in leased
        ]
        Step.objects.bulk_update(
            rows, ["status", "lease_id", "lease_token", "lock_leases", "enqueued_at", "updated_at"]
        )
        return
    at = rawsql.adapt_datetime(now)
    with connection.cursor() as cursor:
        rawsql.execute_prepared(
            cursor,
            _STEPS_LEASE_SQL,
            [
                at,
                at,
                [step.step_id for step in leased],
                [step.lease.id for step in leased],
                [step.lease.token for step in leased],
                [json.dumps(_lock_leases(step)) for step in leased],
            ],
        )


def _lock_leases(step: LeasedStep) -> list[dict[str, Any]]:
    """What a leased step records of its entity locks' leases (``Step.lock_leases``)."""
    return [{"id": g.id, "key": g.key, "token": g.token} for g in step.locks]


# ``steps_lease`` on PostgreSQL: one shape whatever the round's size (arrays, not a CASE per
# row and field as Django's bulk_update builds, which cost a round milliseconds of Python).
_STEPS_LEASE_SQL = f"""
    UPDATE runs_step s SET status = '{StepStatus.LEASED.value}', lease_id = v.lease_id,
        lease_token = v.lease_token, lock_leases = v.lock_leases::jsonb, enqueued_at = %s,
        updated_at = %s
    FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::text[])
        AS v(id, lease_id, lease_token, lock_leases)
    WHERE s.id = v.id
"""


# ready → leased for one step, as one statement (a worker pulling its next step): the first of
# the steps named, in their order, whose row it can lock while it is still ready (SKIP LOCKED: a
# round or another worker has the others), its step lease and entity locks granted in the
# canonical order every writer uses (by key, bytewise, as Python sorts), and the step marked
# leased only when every one was granted. Its keys, holder and the leases' metadata come from
# its row: the workers racing for the same oldest steps try them all in one round trip.
_LEASE_FIRST_SQL = f"""
    WITH locked AS (
        SELECT id, tenant_id, run_id, key, lock_keys, 'step:' || id AS step_key FROM runs_step
        WHERE id = ANY(%(steps)s::bigint[]) AND status = '{StepStatus.READY.value}'
        ORDER BY array_position(%(steps)s::bigint[], id) LIMIT 1
        FOR NO KEY UPDATE SKIP LOCKED
    ), wanted AS (
        SELECT k.key, k.n FROM locked, unnest(
            ARRAY[locked.step_key] || ARRAY(SELECT jsonb_array_elements_text(locked.lock_keys))
        ) WITH ORDINALITY AS k(key, n)
    ), granted AS (
        INSERT INTO core_lease AS l {LEASE_GRANT_COLUMNS}
        SELECT locked.tenant_id, w.key, nextval('core_fencing_token_seq'), locked.run_id || ':' || locked.key,
               jsonb_build_object('run_id', locked.run_id, 'step_id', locked.id, 'step_key', locked.key),
               %(now)s::timestamptz, %(now)s::timestamptz, %(expires)s::timestamptz, NULL
        FROM wanted w, locked ORDER BY w.key COLLATE "C"
        {lease_take_over_sql("l", token_sql="nextval('core_fencing_token_seq')", now="%(now)s")}
        RETURNING l.id, l.key, l.token
    ), marked AS (
        UPDATE runs_step SET {{status}}, lease_id = g.id, lease_token = g.token,
               lock_leases = COALESCE((
                   SELECT jsonb_agg(
                       jsonb_build_object('id', o.id, 'key', o.key, 'token', o.token) ORDER BY w.n)
                   FROM granted o JOIN wanted w ON w.key = o.key WHERE o.key <> locked.step_key
               ), '[]'::jsonb),
               enqueued_at = %(now)s, updated_at = %(now)s
        FROM granted g, locked
        WHERE runs_step.id = locked.id AND g.key = locked.step_key
        AND (SELECT count(*) FROM granted) = (SELECT count(*) FROM wanted)
        RETURNING {{returning}}
    ){{run_started}}
    SELECT (SELECT id FROM locked), (SELECT tenant_id FROM locked), EXISTS (SELECT 1 FROM marked),
           g.id, g.key, g.token{{rows}}
    FROM (SELECT 1) AS one LEFT JOIN granted g ON true{{joins}}
"""
# The same, the step started at once (leased → running in the same statement, as
# ``step_attempt_start`` moves it): for the worker that runs it in this very transaction.
_LEASE_FIRST_AND_START_SQL = _LEASE_FIRST_SQL.format(
    status=_ATTEMPT_STARTED_SET,
    returning="runs_step.*",
    run_started=f", run_started AS ({_run_started_sql('marked')})",
    rows=(
        f", EXISTS (SELECT 1 FROM run_started), {rawsql.select_list(Step, 'm')},"
        f" {rawsql.select_list(Run, 'r')}"
    ),
    joins=" LEFT JOIN marked m ON true LEFT JOIN runs_run r ON r.id = m.run_id",
)
_LEASE_FIRST_SQL = _LEASE_FIRST_SQL.format(
    status=f"status = '{StepStatus.LEASED.value}'",
    returning="runs_step.id",
    run_started="",
    rows="",
    joins="",
)


@dataclass(frozen=True, eq=False)
class Started:
    """A step started (leased → running) by the statement that admitted it: its row, its run's,
    and its grants, as ``step_attempt_start`` returns them."""

    step: Step
    run: Run
    grants: list[LeaseGrant]


def step_lease_first(
    *, step_ids: Sequence[int], ttl: float, now: datetime, start: bool = False
) -> tuple[int | None, bool, dict[str, LeaseGrant], Started | None]:
    """ready → leased for the first of ``step_ids`` whose row can be locked while it is ready,
    in one statement (PostgreSQL; see ``_LEASE_FIRST_SQL``). Returns that step's id (None:
    another admission has each, or none is ready any more), whether it was marked leased
    (False: a key is held; the caller gives back the grants), and the grants by key.
    ``start``: the step is started too (leased → running, the attempt counted, its run running,
    its leases running ``ttl`` from ``now``: the caller runs it in this transaction), and is
    returned as ``Started``."""
    params = {
        "steps": list(step_ids),
        "now": rawsql.adapt_datetime(now),
        "expires": rawsql.adapt_datetime(now + timedelta(seconds=ttl)),
    }
    if start:
        params["worker"] = worker_id()
    with connection.cursor() as cursor:
        # Planned as index scans of the primary key: a bitmap scan, which PostgreSQL picks for
        # ``id = ANY`` where statistics are missing, reads every dead version's page each time.
        sql = _LEASE_FIRST_AND_START_SQL if start else _LEASE_FIRST_SQL
        rawsql.execute_prepared(cursor, sql, params, without_bitmap_scans=True)
        rows = cursor.fetchall()
    locked, tenant_id, marked = rows[0][0], rows[0][1], bool(rows[0][2])
    granted = {
        key: LeaseGrant(lease_id, tenant_id, key, token, now, now)
        for _, _, _, lease_id, key, token, *_ in rows
        if key
    }
    started = None
    if start and marked:
        first = rows[0]
        step = rawsql.from_row(Step, first, 7)
        run = rawsql.from_row(Run, first, 7 + rawsql.width(Step))
        started = Started(step, run, _started(step, run, now, now + timedelta(seconds=ttl), bool(first[6])))
    return locked, marked, granted, started
