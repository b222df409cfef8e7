"""Writes of the runs app: starting runs (deduplicated triggers) and the side-effect ledger."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from core import metrics
from core import services as core_services
from core.leases import LeaseGrant, fenced_write, lease_revoke
from core.models import Lease, Tenant, TenantQuota
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus, TriggerEvent

UNFINISHED_RUN_STATUSES = (
    RunStatus.PENDING,
    RunStatus.RUNNING,
    RunStatus.WAITING_APPROVAL,
    RunStatus.CONFLICT,
)


def fingerprint(value: Any) -> str:
    """A stable hash of a JSON-able value (key order and spacing do not matter)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


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
) -> RunStart:
    """Start a run, once per (tenant, trigger_event_id).

    A duplicate delivery returns the existing run (``created`` False). The same id with a
    different payload raises TriggerPayloadMismatch and is recorded as an event. The unique
    constraint decides between racing deliveries: the loser's insert waits for the winner's
    commit, fails, and reads the winner's run.
    """
    payload = {"workflow": workflow, "input": input, "correlation_id": correlation_id}
    payload_fingerprint = fingerprint(payload)
    if trigger_event_id:
        # A known delivery is answered from the record, even when the tenant is over quota.
        seen = TriggerEvent.objects.filter(tenant=tenant, trigger_event_id=trigger_event_id).first()
        if seen is not None:
            return _replay(tenant, seen, trigger_event_id, payload_fingerprint, actor, payload)
    try:
        with transaction.atomic():
            if enforce_quota:
                _check_queue_depth(tenant)
            run = Run.objects.create(
                tenant=tenant,
                workflow=workflow,
                input=input,
                actor=actor,
                correlation_id=correlation_id,
                trigger_event_id=trigger_event_id,
                environment=environment,
            )
            if trigger_event_id:
                TriggerEvent.objects.create(
                    tenant=tenant, trigger_event_id=trigger_event_id, fingerprint=payload_fingerprint, run=run
                )
            if build_steps is not None:
                Step.objects.bulk_create(build_steps(run))
            core_services.event_record(
                tenant=tenant,
                subject=f"run:{run.id}",
                verb="created",
                actor=actor,
                payload={"workflow": workflow, "trigger_event_id": trigger_event_id},
            )
            return RunStart(run=run, created=True)
    except IntegrityError:
        if not trigger_event_id:
            raise
    existing = TriggerEvent.objects.select_related("run").get(
        tenant=tenant, trigger_event_id=trigger_event_id
    )
    return _replay(tenant, existing, trigger_event_id, payload_fingerprint, actor, payload)


def _replay(
    tenant: Tenant,
    existing: TriggerEvent,
    trigger_event_id: str,
    payload_fingerprint: str,
    actor: str,
    proposed_payload: dict[str, Any],
) -> RunStart:
    if existing.fingerprint != payload_fingerprint:
        from runs.gates import report_conflict

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
    return RunStart(run=existing.run, created=False)


class QuotaExceeded(Exception):
    def __init__(self, tenant: Tenant, depth: int, limit: int) -> None:
        super().__init__(
            f"tenant {tenant.slug} has {depth} unfinished runs; its queue-depth quota is {limit}"
        )
        self.depth = depth
        self.limit = limit
        self.retry_after = 5


def _check_queue_depth(tenant: Tenant) -> None:
    """Refuse a new run when the tenant is at its queue depth. The quota row is locked for the
    rest of the transaction, so racing triggers of one tenant are counted one after another."""
    quota = TenantQuota.objects.select_for_update().filter(tenant=tenant).first()
    limit = quota.max_queue_depth if quota else TenantQuota._meta.get_field("max_queue_depth").get_default()
    depth = Run.objects.filter(tenant=tenant, status__in=UNFINISHED_RUN_STATUSES).count()
    if depth >= limit:
        raise QuotaExceeded(tenant, depth, limit)


def run_start(
    *,
    tenant: Tenant,
    workflow: str,
    input: dict[str, Any],
    actor: str,
    correlation_id: str = "",
    trigger_event_id: str = "",
) -> RunStart:
    """Start a run of a registered workflow: its steps are created, the first one ready.

    Raises UnknownWorkflow, QuotaExceeded or TriggerPayloadMismatch. The dispatcher is kicked
    when the run commits.
    """
    from runs.definitions import get_workflow
    from runs.tasks import kick_dispatcher

    definition = get_workflow(workflow)

    def build_steps(run: Run) -> list[Step]:
        return [
            Step(
                run=run,
                tenant_id=run.tenant_id,
                key=spec.key,
                position=position,
                lane=spec.lane,
                tool=spec.tool,
                status=StepStatus.READY if position == 0 else StepStatus.PENDING,
            )
            for position, spec in enumerate(definition.steps)
        ]

    start = run_create(
        tenant=tenant,
        workflow=workflow,
        input=input,
        actor=actor,
        correlation_id=correlation_id,
        trigger_event_id=trigger_event_id,
        build_steps=build_steps,
        enforce_quota=True,
    )
    if start.created:
        kick_dispatcher()
    return start


def run_cancel(*, run: Run, actor: str, reason: str = "cancelled") -> bool:
    """Cancel an unfinished run: waiting steps are cancelled, running ones are fenced out (their
    leases, locks and seats are revoked now; they notice at their next heartbeat). False when
    the run had already finished."""
    now = timezone.now()
    with transaction.atomic():
        cancelled = Run.objects.filter(pk=run.pk, status__in=UNFINISHED_RUN_STATUSES).update(
            status=RunStatus.CANCELLED, finished_at=now, updated_at=now
        )
        if cancelled != 1:
            return False
        live_steps = list(
            Step.objects.select_for_update()
            .filter(run=run)
            .exclude(status__in=[StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED])
            .order_by("pk")
        )
        keys = [key for step in live_steps for key in (f"step:{step.pk}", *step.lock_keys)]
        lease_revoke(tenant_id=run.tenant_id, keys=keys)
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
    return True


def run_cancel_by_id(*, run_id: str, actor: str, reason: str) -> bool:
    run = Run.objects.filter(pk=run_id).first()
    return run is not None and run_cancel(run=run, actor=actor, reason=reason)


def step_resume(
    *, step: Step, actor: str, from_statuses: tuple[str, ...] = (StepStatus.WAITING_APPROVAL,)
) -> bool:
    """Make a parked step ready again, once: a conditional UPDATE, so two racing resumes (two
    approvals, an approval and a timeout) move it exactly once. Call in the deciding transaction."""
    from runs.tasks import kick_dispatcher

    now = timezone.now()
    resumed = Step.objects.filter(pk=step.pk, status__in=from_statuses).update(
        status=StepStatus.READY, available_at=now, error="", updated_at=now
    )
    if resumed != 1:
        return False
    Run.objects.filter(pk=step.run_id, status__in=[RunStatus.WAITING_APPROVAL, RunStatus.CONFLICT]).update(
        status=RunStatus.RUNNING, updated_at=now
    )
    core_services.event_record(
        tenant=step.tenant_id,
        subject=f"run:{step.run_id}",
        verb="step_resumed",
        actor=actor,
        payload={"step": step.key},
    )
    kick_dispatcher()
    return True


def step_fail(*, step: Step, actor: str, reason: str, from_statuses: tuple[str, ...]) -> bool:
    """Fail a parked step and its run (a rejection, a reviewer's cancel). Once, like step_resume."""
    now = timezone.now()
    failed = Step.objects.filter(pk=step.pk, status__in=from_statuses).update(
        status=StepStatus.FAILED, error=reason, finished_at=now, updated_at=now
    )
    if failed != 1:
        return False
    Run.objects.filter(pk=step.run_id).exclude(status__in=[RunStatus.CANCELLED, RunStatus.SUCCEEDED]).update(
        status=RunStatus.FAILED, finished_at=now, updated_at=now
    )
    core_services.event_record(
        tenant=step.tenant_id,
        subject=f"run:{step.run_id}",
        verb="run_failed",
        actor=actor,
        payload={"step": step.key, "reason": reason},
    )
    return True


def run_rewind(*, step: Step, to_step_key: str, actor: str, note: str = "") -> bool:
    """Send a parked step's run back to an earlier step ("request changes" → redraft): that step
    is ready again and every step after it pending. Once, from ``waiting_approval`` only."""
    from runs.tasks import kick_dispatcher

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
    Run.objects.filter(pk=step.run_id).update(status=RunStatus.RUNNING, updated_at=now)
    core_services.event_record(
        tenant=step.tenant_id,
        subject=f"run:{step.run_id}",
        verb="changes_requested",
        actor=actor,
        payload={"step": step.key, "back_to": to_step_key, "note": note},
    )
    kick_dispatcher()
    return True


def step_outputs(run: Run, before_position: int | None = None) -> dict[str, Any]:
    """Outputs of the run's succeeded steps, by step key."""
    steps = Step.objects.filter(run=run, status=StepStatus.SUCCEEDED)
    if before_position is not None:
        steps = steps.filter(position__lt=before_position)
    return dict(steps.order_by("position").values_list("key", "output"))


def step_lock_context(step: Step) -> dict[str, Any]:
    """What lock-key templates are filled from: earlier outputs (dicts), then the run input."""
    context: dict[str, Any] = {}
    for output in step_outputs(step.run, before_position=step.position).values():
        if isinstance(output, dict):
            context.update(output)
    context.update(step.run.input)
    return context


def step_checkpoint(*, step: Step, lease: LeaseGrant, data: Any) -> None:
    """Save a step's progress, only while its lease is live (a fenced write)."""
    with fenced_write(tenant_id=step.tenant_id, key=lease.key, token=lease.token, actor=f"step:{step.pk}"):
        Step.objects.filter(pk=step.pk).update(checkpoint=data, updated_at=timezone.now())


class EffectError(Exception):
    pass


class EffectRequestMismatch(EffectError):
    """The idempotency key was used before for a different request."""


class EffectUnresolved(EffectError):
    """A proposed effect has no recorded outcome.

    ``in_flight`` is True while the proposer's lease is live (someone is executing it right
    now); otherwise the effect is ambiguous — it may or may not have happened — and must be
    reviewed, never blindly retried.
    """

    def __init__(self, effect: SideEffect, in_flight: bool) -> None:
        state = "in flight" if in_flight else "ambiguous (proposed, no recorded outcome)"
        super().__init__(f"effect {effect.idempotency_key} is {state}")
        self.effect = effect
        self.in_flight = in_flight


@dataclass(frozen=True)
class EffectOutcome:
    effect: SideEffect
    result: Any
    replayed: bool  # True: the recorded result of an earlier execution, the callable did not run


def _proposer_is_live(effect: SideEffect) -> bool:
    if effect.proposer_lease_id is None or effect.proposer_token is None:
        return False
    now = timezone.now()
    return Lease.objects.filter(
        pk=effect.proposer_lease_id,
        token=effect.proposer_token,
        released_at__isnull=True,
        expires_at__gt=now,
    ).exists()


def _propose(
    *,
    key: str,
    run: Run,
    step: Step | None,
    kind: str,
    request: dict[str, Any],
    request_fingerprint: str,
    lease: LeaseGrant | None,
) -> tuple[SideEffect, bool]:
    """Insert the ``proposed`` row, or find the one a racing caller inserted first."""
    return SideEffect.objects.get_or_create(
        idempotency_key=key,
        defaults={
            "tenant_id": run.tenant_id,
            "run": run,
            "step": step,
            "kind": kind,
            "request": request,
            "request_fingerprint": request_fingerprint,
            "proposer_lease_id": lease.id if lease else None,
            "proposer_token": lease.token if lease else None,
        },
    )


def effect_execute(
    *,
    run: Run,
    step: Step | None,
    kind: str,
    fn: Callable[[], Any],
    request: dict[str, Any] | None = None,
    idempotency_key: str = "",
    lease: LeaseGrant | None = None,
    external_ref: Callable[[Any], str] | None = None,
    guard: Callable[[], None] | None = None,
) -> EffectOutcome:
    """Run ``fn`` at most once per idempotency key, through the ledger.

    1. The ``proposed`` row is committed *before* ``fn`` runs, so a crash afterwards leaves an
       ambiguous record rather than a silent second execution.
    2. Whoever inserts the row runs ``fn``; everyone else gets the recorded result (committed),
       EffectUnresolved (proposed), or becomes the runner of a retry (failed, claimed by a
       conditional UPDATE so only one retrier wins).
    3. The outcome is recorded with a conditional UPDATE on ``status='proposed'``.

    ``guard`` runs in the transaction that writes the proposal; if it raises, nothing is
    proposed and ``fn`` does not run (the approval gate checks the approved version there).

    Must not be called inside a transaction: the proposal has to be durable before ``fn``.
    """
    if transaction.get_connection().in_atomic_block:
        raise RuntimeError(
            "effect_execute must not run inside a transaction (the proposal must commit first)"
        )
    key = idempotency_key or f"{run.id}:{step.key if step else '-'}:{kind}"
    request = request or {}
    request_fingerprint = fingerprint(request)
    with transaction.atomic():
        if guard is not None:
            guard()
        effect, created = _propose(
            key=key,
            run=run,
            step=step,
            kind=kind,
            request=request,
            request_fingerprint=request_fingerprint,
            lease=lease,
        )
    if not created:
        if effect.request_fingerprint != request_fingerprint:
            raise EffectRequestMismatch(f"idempotency key {key} was used for a different request")
        if effect.status == EffectStatus.COMMITTED:
            metrics.DUPLICATES_SUPPRESSED.labels(kind="effect").inc()
            return EffectOutcome(effect=effect, result=effect.result, replayed=True)
        if effect.status == EffectStatus.PROPOSED:
            raise EffectUnresolved(effect, in_flight=_proposer_is_live(effect))
        # Failed before: exactly one retrier re-proposes it.
        claimed = SideEffect.objects.filter(pk=effect.pk, status=EffectStatus.FAILED).update(
            status=EffectStatus.PROPOSED,
            attempts=F("attempts") + 1,
            error="",
            proposer_lease_id=lease.id if lease else None,
            proposer_token=lease.token if lease else None,
            updated_at=timezone.now(),
        )
        effect.refresh_from_db()
        if claimed != 1:
            if effect.status == EffectStatus.COMMITTED:
                return EffectOutcome(effect=effect, result=effect.result, replayed=True)
            raise EffectUnresolved(effect, in_flight=_proposer_is_live(effect))

    try:
        with metrics.EFFECT_LATENCY_SECONDS.labels(kind=kind).time():
            result = fn()
    except Exception as exc:
        SideEffect.objects.filter(pk=effect.pk, status=EffectStatus.PROPOSED).update(
            status=EffectStatus.FAILED, error=f"{type(exc).__name__}: {exc}", failed_at=timezone.now()
        )
        raise
    now = timezone.now()
    ref = external_ref(result) if external_ref else ""
    SideEffect.objects.filter(pk=effect.pk, status=EffectStatus.PROPOSED).update(
        status=EffectStatus.COMMITTED, result=result, external_ref=ref, committed_at=now, updated_at=now
    )
    effect.refresh_from_db()
    return EffectOutcome(effect=effect, result=result, replayed=False)
