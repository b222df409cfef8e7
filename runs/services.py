"""Writes of the runs app: starting runs (validated input, deduplicated triggers), cancelling
them, and checkpoints. State transitions live in ``runs.transitions``, the ledger in
``runs.ledger``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

from core import metrics, rawsql, tallies, tracing
from core import services as core_services
from core.access import member_role_check
from core.after_response import after_response
from core.connections import ConnectionInvalid, connections_bind, environment_check
from core.models import Role, Tenant, User
from core.transactions import transaction_retried_once
from core.validation import fingerprint
from core.wakeups import wake_on_commit
from runs import transitions
from runs.definitions import (
    InvalidInput,
    SessionPolicy,
    UnknownWorkflow,
    Workflow,
    WorkflowDefinitionError,
    get_workflow,
)
from runs.gates import report_conflict
from runs.locking import held_key_share_sql, run_steps_lock, wake_for_ready_step
from runs.models import Run, SessionState, Step, StepStatus, TriggerEvent, new_run_id
from runs.queue_depth import (
    DEPTH_SHARD_SQL,
    REFUSED_FAST,
    QuotaExceeded,
    queue_place_fast_sql,
    queue_place_take,
)
from runs.sessions import MAX_SESSION_KEY_LENGTH, queue_deadline, session_admit
from runs.transitions import UNFINISHED_RUN_STATUSES, step_lock_keys

# Re-exported: what callers of run_start catch, and the statuses they count as unfinished.
__all__ = ["QuotaExceeded", "UNFINISHED_RUN_STATUSES"]

# The contract of recent runs, by id: it never changes once a run exists, so each process
# reads it at most once per run (and not at all for runs it started or picked up).
_contracts: OrderedDict[str, dict[str, Any]] = OrderedDict()
CONTRACT_CACHE_SIZE = 10_000


def contract_remember(run: Run) -> dict[str, Any]:
    contract = run.contract()
    _contracts[run.id] = contract
    _contracts.move_to_end(run.id)
    while len(_contracts) > CONTRACT_CACHE_SIZE:
        _contracts.popitem(last=False)
    return contract


def event_with_run_contract(subject: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Event enricher: every event about a run (subject ``run:<id>``) carries the run's
    contract — correlation id, actor, environment, session, version, connections."""
    if not subject.startswith("run:") or "contract" in payload:
        return payload
    run_id = subject.removeprefix("run:")
    contract = _contracts.get(run_id)
    if contract is None:
        run = Run.objects.filter(pk=run_id).first()
        if run is None:
            return payload
        contract = contract_remember(run)
    return {**payload, "contract": contract}


class TriggerPayloadMismatch(Exception):
    """The trigger id was seen before with a different payload."""

    def __init__(self, trigger_event_id: str, run_id: str) -> None:
        super().__init__(
            f"trigger_event_id {trigger_event_id!r} was already used for run {run_id} with another payload"
        )
        self.trigger_event_id = trigger_event_id
        self.run_id = run_id


@dataclass(frozen=True)
class RunStart:
    run: Run
    created: bool  # False: a duplicate delivery, ``run`` is the one the first delivery made
    # Its steps as the start wrote them, ids included, where the start read those back (a start
    # in one round trip): what the API answers with, without reading the run again.
    steps: list[Step] | None = None


def run_create(
    *,
    tenant: Tenant,
    workflow: str,
    input: dict[str, Any],
    actor: str,
    correlation_id: str = "",
    trigger_event_id: str = "",
    environment: str = "production",
    build_steps: Callable[[Run], list[Step]] | None = None,
    enforce_quota: bool = False,
    workflow_version: str = "",
    session_key: str = "",
    sequence: int | None = None,
    session: SessionPolicy | None = None,
    replay_of: Run | None = None,
    connections: dict[str, Any] | None = None,
    traceparent: str = "",
) -> RunStart:
    """Start a run, once per (tenant, trigger_event_id).

    A duplicate delivery returns the existing run (``created`` False). The same id with a
    different payload raises TriggerPayloadMismatch and is recorded as an event. The unique
    constraint decides between racing deliveries: the loser's insert waits for the winner's
    commit, fails, and reads the winner's run.
    """
    payload: dict[str, Any] = {"workflow": workflow, "input": input, "correlation_id": correlation_id}
    if environment != "production":
        payload["environment"] = environment
    if session_key:
        payload.update(session_key=session_key, sequence=sequence)
    session = session or SessionPolicy()
    payload_fingerprint = fingerprint(payload)

    def known_delivery() -> RunStart | None:
        # A known delivery is answered from the record, even when the tenant is over quota.
        seen = _delivery_of(tenant.pk, trigger_event_id)
        if seen is None:
            return None
        return _replay(tenant, seen, trigger_event_id, payload_fingerprint, actor, payload)

    # Where the start can be one round trip, a new delivery id (the usual case) is not looked up
    # first: the unique constraint refuses a known one, which is then answered from the record.
    in_one_round_trip = (
        enforce_quota
        and not session_key
        and rawsql.on_postgresql()
        and not transaction.get_connection().in_atomic_block
    )
    if trigger_event_id and not in_one_round_trip and (replayed := known_delivery()):
        return replayed
    run_id = new_run_id()
    run = Run(
        id=run_id,
        tenant=tenant,
        workflow=workflow,
        workflow_version=workflow_version,
        input=input,
        actor=actor,
        correlation_id=correlation_id or trigger_event_id or run_id,
        trigger_event_id=trigger_event_id,
        environment=environment,
        session_key=session_key,
        sequence=sequence,
        session_state=SessionState.WAITING if session_key else SessionState.NONE,
        session_max=session.max_concurrent,
        session_gap_seconds=session.sequence_gap_seconds,
        queue_deadline=queue_deadline(session) if session_key else None,
        replay_of=replay_of,
        connections=connections or {},
        traceparent=traceparent,
    )
    steps = build_steps(run) if build_steps is not None else []
    trigger = (
        TriggerEvent(
            tenant=tenant, trigger_event_id=trigger_event_id, fingerprint=payload_fingerprint, run=run
        )
        if trigger_event_id
        else None
    )
    created: dict[str, Any] = {
        "subject": f"run:{run.id}",
        "verb": "created",
        "actor": actor,
        "payload": {
            "workflow": workflow,
            "workflow_version": workflow_version,
            "correlation_id": run.correlation_id,
            "environment": environment,
            "connections": {p: c["name"] for p, c in (connections or {}).items()},
            "trigger_event_id": trigger_event_id,
            **({"session_key": session_key, "sequence": sequence} if session_key else {}),
            **({"replay_of": replay_of.pk} if replay_of else {}),
        },
    }
    if in_one_round_trip:
        if _created_in_one_round_trip(run, steps, trigger, created):
            return RunStart(run=run, created=True, steps=steps)
        if trigger_event_id and (replayed := known_delivery()):
            return replayed  # refused as a known delivery, or near the quota: the record answers
    try:
        with transaction.atomic():
            if session_key:  # before the queue place: see runs/queue_depth.py on lock order
                session_admit(tenant_id=tenant.pk, session_key=session_key, policy=session, actor=actor)
            run.depth_shard = queue_place_take(tenant) if enforce_quota else 0
            rows, row_params = "", list[Any]()
            if rawsql.on_postgresql():
                # The run and its steps are written with the run's event, in one round trip (the
                # foreign keys are checked at commit).
                rows, row_params = rawsql.insert_sql([run])
                if steps:
                    step_rows, step_params = rawsql.insert_sql(steps)
                    rows, row_params = rows + step_rows, row_params + step_params
            else:  # SQLite runs one statement per call
                run.save(force_insert=True)
                Step.objects.bulk_create(steps)
            contract_remember(run)
            if trigger is not None:
                trigger.save(force_insert=True)
            if steps:
                if session_key:
                    wake_on_commit()  # the dispatcher gives it its turn
                else:
                    wake_on_commit(lane=steps[0].lane)
            core_services.event_record(tenant=tenant, **created, prelude_sql=(rows, row_params))
            return RunStart(run=run, created=True)
    except IntegrityError:
        if not trigger_event_id:
            raise
        existing = _delivery_of(tenant.pk, trigger_event_id)
        if existing is None:  # refused by another constraint than the delivery id's
            raise
    return _replay(tenant, existing, trigger_event_id, payload_fingerprint, actor, payload)


_DELIVERY_SQL = (
    f"SELECT {rawsql.select_list(TriggerEvent, 'd')}, {rawsql.select_list(Run, 'r')},"
    f" {rawsql.select_list(Tenant, 't')} FROM runs_triggerevent d JOIN runs_run r ON r.id = d.run_id"
    " JOIN core_tenant t ON t.id = r.tenant_id WHERE d.tenant_id = %s AND d.trigger_event_id = %s"
)


def _delivery_of(tenant_id: int, trigger_event_id: str) -> TriggerEvent | None:
    """The recorded delivery of that id, with its run and the run's tenant (the answer shows
    both), in one hand-written statement: a client retrying a start is answered about as fast
    as a new start (the ORM's query building took longer than the read itself)."""
    rows = rawsql.fetch_rows(_DELIVERY_SQL, [tenant_id, trigger_event_id])
    if not rows:
        return None
    delivery, delivery.run, delivery.run.tenant = rawsql.from_joined_row(rows[0], TriggerEvent, Run, Tenant)
    return delivery


def _created_in_one_round_trip(
    run: Run, steps: list[Step], trigger: TriggerEvent | None, created: dict[str, Any]
) -> bool:
    """Write a new run whole — its trigger delivery, its queue place (the fast path), the run,
    its steps and its ``created`` event — as one transaction in a single round trip to
    PostgreSQL, where the start does not already sit in a transaction. False, with nothing
    written, where the queue place needs the slow path or the delivery id is taken: the
    caller's transaction then decides, as for any start."""
    statements: list[tuple[str, list[Any]]] = []

    def add(sql: str, params: list[Any]) -> None:
        statements.append((sql.strip().removesuffix(";"), params))

    if trigger is not None:
        # First: a known delivery id (a client retrying) stops the round trip at once, before
        # the queue place and the run's rows (the foreign key to the run is checked at commit).
        add(*rawsql.insert_sql([trigger]))
    add(*queue_place_fast_sql(run.tenant_id, refuse=True))
    for rows, expressions in (([run], {"depth_shard": DEPTH_SHARD_SQL}), (steps, None)):
        if rows:
            add(*rawsql.insert_sql(rows, expressions=expressions))
    contract_remember(run)  # the event carries the run's contract
    event_sql, event_params, recorded = core_services.event_insert_sql(tenant=run.tenant_id, **created)
    add(event_sql, event_params)
    # Last, just before the commit: whether the first step waits for a key held elsewhere.
    waits_sql, waits_params = held_key_share_sql(steps[0], timezone.now()) if steps else ("false", [])
    try:
        event_id, run.depth_shard, step_ids, waits_for_key = rawsql.transaction_in_one_round_trip(
            statements,
            then=(
                "SELECT currval(pg_get_serial_sequence('core_event', 'id')),"
                " (SELECT depth_shard FROM runs_run WHERE id = %s),"
                f" ARRAY(SELECT id FROM runs_step WHERE run_id = %s ORDER BY position), {waits_sql}",
                [run.id, run.id, *waits_params],
            ),
        )
    except DatabaseError as exc:
        refused = getattr(exc.__cause__, "pgcode", "") == REFUSED_FAST
        if refused or (trigger is not None and isinstance(exc, IntegrityError)):
            return False
        raise
    for step, step_id in zip(steps, step_ids, strict=True):
        step.pk = step_id
    core_services.event_committed(recorded(event_id))
    if steps:
        wake_for_ready_step(steps[0], waits_for_key)
    return True


def _replay(
    tenant: Tenant,
    existing: TriggerEvent,
    trigger_event_id: str,
    payload_fingerprint: str,
    actor: str,
    proposed_payload: dict[str, Any],
) -> RunStart:
    if existing.fingerprint != payload_fingerprint:
        with transaction.atomic():
            core_services.event_record(
                tenant=tenant,
                subject=f"run:{existing.run_id}",
                verb="duplicate_trigger_payload",
                actor=actor,
                payload={"trigger_event_id": trigger_event_id, "fingerprint": payload_fingerprint},
            )
            first = existing.run
            report_conflict(
                "duplicate_trigger_payload",
                tenant_id=tenant.pk,
                run=first,
                target_key=f"trigger:{trigger_event_id}",
                current={
                    "workflow": first.workflow,
                    "input": first.input,
                    "correlation_id": first.correlation_id,
                },
                proposed=proposed_payload,
            )
        raise TriggerPayloadMismatch(trigger_event_id, existing.run_id)
    metrics.DUPLICATES_SUPPRESSED.labels(kind="trigger").inc()
    # Counted for the console once the answer is out: a client retrying is not kept waiting
    # for a write of its own (and its commit) that its answer does not need.
    after_response(partial(tallies.tally_add, [(tenant.pk, tallies.DUPLICATES_SUPPRESSED)]))
    return RunStart(run=existing.run, created=False)


def run_start(
    *,
    tenant: Tenant,
    workflow: str,
    input: dict[str, Any],
    actor: str,
    correlation_id: str = "",
    trigger_event_id: str = "",
    session_key: str = "",
    sequence: int | None = None,
    replay_of: Run | None = None,
    environment: str = "production",
    connections: Mapping[str, str] | None = None,
) -> RunStart:
    """Start a run of a registered workflow, in one transaction: its input validated, its
    environment checked and its connections bound (``connections`` names some by provider; the
    environment's defaults for the rest the workflow declares), its version pinned, its steps
    created with everything known at start resolved (lane, tool, lock policy, retry budget,
    and the first step's lock keys), the first step ready — or, for a run of a session
    (``session_key``), queued for its turn (see ``runs.sessions``). The
    dispatcher is woken on commit.

    Raises UnknownWorkflow, InvalidInput (nothing stored), QuotaExceeded, SessionOverflow or
    TriggerPayloadMismatch.
    """
    definition = get_workflow(workflow)
    input = definition.validate_input(input)
    session_fields = _session_fields(session_key, sequence)
    if session_fields:
        raise InvalidInput(session_fields, "the session fields are not valid")
    try:
        environment_check(tenant, environment)
        bound = connections_bind(
            tenant=tenant,
            environment=environment,
            providers=definition.connections,
            requested=dict(connections or {}),
        )
    except ConnectionInvalid as exc:
        raise InvalidInput(exc.fields, str(exc)) from None
    try:
        first_locks = step_lock_keys(
            workflow=workflow, version=definition.version, step_key=definition.steps[0].key, context=input
        )
    except WorkflowDefinitionError as exc:
        raise InvalidInput({"__all__": str(exc)}) from None

    def build_steps(run: Run) -> list[Step]:
        return [
            Step(
                run=run,
                tenant_id=run.tenant_id,
                key=spec.key,
                position=position,
                lane=spec.lane,
                tool=spec.tool,
                lock_policy=spec.lock_policy,
                max_attempts=spec.retry.max_attempts,
                lock_keys=first_locks if position == 0 else [],
                status=StepStatus.READY if position == 0 and not session_key else StepStatus.PENDING,
            )
            for position, spec in enumerate(definition.steps)
        ]

    # The run's trace: its start span, a child of the current one (the request starting it).
    with tracing.run_started(
        f"run {workflow}", {"runwarden.workflow": workflow, "runwarden.tenant": tenant.slug}
    ) as span:
        start = run_create(
            tenant=tenant,
            workflow=workflow,
            input=input,
            actor=actor,
            correlation_id=correlation_id,
            trigger_event_id=trigger_event_id,
            build_steps=build_steps,
            enforce_quota=True,
            workflow_version=definition.version,
            session_key=session_key,
            sequence=sequence,
            session=definition.session,
            replay_of=replay_of,
            environment=environment,
            connections=bound,
            traceparent=tracing.traceparent_of(span),
        )
        span.set_attributes({"runwarden.run_id": start.run.id, "runwarden.created": start.created})
    return start


def _session_fields(session_key: str, sequence: int | None) -> dict[str, str]:
    """Errors in a run's session fields, by field (empty when they are fine)."""
    fields: dict[str, str] = {}
    if len(session_key) > MAX_SESSION_KEY_LENGTH:
        fields["session_key"] = f"at most {MAX_SESSION_KEY_LENGTH} characters"
    elif "\x00" in session_key:
        fields["session_key"] = "may not contain NUL characters"
    elif session_key != session_key.strip():
        fields["session_key"] = "may not start or end with whitespace"
    if sequence is not None:
        if not session_key:
            fields["sequence"] = "a sequence needs a session_key"
        elif not 1 <= sequence < 2**62:
            fields["sequence"] = "must be between 1 and 2^62 (sequences count from 1 in each session)"
    return fields


def run_cancel(*, run: Run, actor: str, reason: str = "cancelled", by: User | None = None) -> bool:
    """Cancel an unfinished run: ``transitions.run_cancel_in_transaction`` in a transaction of
    its own, tried once more on a deadlock. False when already finished. ``by``: the person
    cancelling; PermissionDenied unless an operator of the run's tenant at that instant
    (checked under the run's anchor, runs/locking.py)."""
    return transaction_retried_once(
        lambda: transitions.run_cancel_in_transaction(run=run, actor=actor, reason=reason, by=by)
    )


def run_cancel_by_id(*, run_id: str, actor: str, reason: str) -> bool:
    run = Run.objects.filter(pk=run_id).first()
    return run is not None and run_cancel(run=run, actor=actor, reason=reason)


# The transitions other apps (approvals) move parked steps with.
step_resume = transitions.step_resume
step_fail = transitions.step_fail
run_rewind = transitions.run_rewind
step_await_approval = transitions.step_await_approval
compensation_retry = transitions.compensation_retry
compensation_mark_done = transitions.compensation_mark_done
step_inputs_forget = transitions.step_inputs_forget


def step_outputs(run: Run, before_position: int | None = None) -> dict[str, Any]:
    """Outputs of the run's succeeded steps (before ``before_position``), by step key: read as
    a resumed or retried step starts, hand-written (prepared in a worker's chain)."""
    rows = rawsql.fetch_rows(
        _OUTPUTS_SQL, [run.pk, _NO_POSITION if before_position is None else before_position]
    )
    return {key: rawsql.from_column(Step, "output", value) for key, value in rows}


_OUTPUTS_SQL = (
    "SELECT s.key, s.output FROM runs_step s WHERE s.run_id = %s"
    f" AND s.status = '{StepStatus.SUCCEEDED.value}' AND s.position < %s ORDER BY s.position"
)
# No step's position reaches this one (a PostgreSQL integer's largest value).
_NO_POSITION = 2**31 - 1


class RunNotRetryable(Exception):
    """The run cannot be retried: it has not failed, or its pinned version is gone."""


def run_retry(*, run: Run, actor: str, by: User | None = None) -> Run:
    """Retry a failed, cancelled or expired run from its first unfinished step: the same run,
    its next attempt, the same idempotency keys, so an effect that committed is answered from
    the ledger and never happens again. Its steps from there on start over (the retried step
    gets a fresh attempt budget); a session run takes its turn again.

    A compare-and-set on the run's status: of two racing retries, one wins, the other raises
    RunNotRetryable, as does a run whose pinned workflow version is no longer registered.
    ``by``: the person retrying; PermissionDenied unless an operator of the run's tenant at that
    instant.
    """
    if run.compensation:
        raise RunNotRetryable(f"run {run.id} was compensated (its effects were undone): replay it instead")
    try:
        definition = get_workflow(run.workflow, run.workflow_version)
    except UnknownWorkflow as exc:
        raise RunNotRetryable(str(exc)) from None
    now = timezone.now()
    transaction_retried_once(lambda: _retry(run, definition, actor, now, by))
    run.refresh_from_db()
    return run


def _retry(run: Run, definition: Workflow, actor: str, now: datetime, by: User | None) -> None:
    """The retry itself, in the caller's transaction."""
    run_steps_lock(run.pk)  # the anchor (runs/locking.py): step rows, then the run
    if by is not None:
        member_role_check(by, run.tenant_id, [Role.OPERATOR], "retrying this run")
    steps = list(Step.objects.filter(run=run).order_by("position"))
    target = next((s for s in steps if s.status != StepStatus.SUCCEEDED), None)
    if target is None:
        raise RunNotRetryable(f"run {run.id} has no unfinished step to retry")
    outputs = {s.key: s.output for s in steps if s.status == StepStatus.SUCCEEDED}
    try:
        keys = step_lock_keys(
            workflow=run.workflow,
            version=run.workflow_version,
            step_key=target.key,
            context=transitions.lock_context(run, outputs),
        )
        budget = definition.spec(target.key).retry.max_attempts
    except (UnknownWorkflow, WorkflowDefinitionError) as exc:
        raise RunNotRetryable(str(exc)) from None
    deadline = queue_deadline(definition.session, now) if run.session_key else None
    if not transitions.run_retry_from(
        run=run, target=target, lock_keys=keys, budget=budget, queue_deadline=deadline, actor=actor, now=now
    ):
        run.refresh_from_db(fields=["status"])
        raise RunNotRetryable(
            f"run {run.id} is {run.status}: only a failed, cancelled or expired run is retried"
        )


def run_replay(
    *,
    run: Run,
    actor: str,
    input: dict[str, Any] | None = None,
    connections: Mapping[str, str] | None = None,
) -> Run:
    """Start the run again as a new run linked to it (``replay_of``), with its input or an
    edited one (validated like any start), on the workflow's current version, in the same
    environment and session, with the connections it bound (or ``connections``, by provider,
    e.g. when one of those was archived). The new run has its own idempotency keys: a replay
    does its effects again, on purpose.

    Raises UnknownWorkflow, InvalidInput, QuotaExceeded or SessionOverflow, like ``run_start``.
    """
    bound = {p: c["name"] for p, c in run.connections.items() if isinstance(c, dict) and "name" in c}
    with transaction.atomic():
        start = run_start(
            tenant=run.tenant,
            workflow=run.workflow,
            input=run.input if input is None else input,
            actor=actor,
            correlation_id=run.correlation_id,
            replay_of=run,
            environment=run.environment,
            connections={**bound, **(connections or {})},
            session_key=run.session_key,
        )
        core_services.event_record(
            tenant=run.tenant_id,
            subject=f"run:{run.id}",
            verb="run_replayed",
            actor=actor,
            payload={"replay": start.run.id, "input_edited": input is not None and input != run.input},
        )
    return start.run
