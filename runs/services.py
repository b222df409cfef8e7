"""Writes of the runs app: starting runs (validated input, deduplicated triggers), cancelling
them, and checkpoints. State transitions live in ``runs.transitions``, the ledger in
``runs.ledger``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from core import metrics
from core import services as core_services
from core.leases import LeaseGrant, fenced_write
from core.models import Tenant, TenantQuota
from core.wakeups import wake_on_commit
from runs import transitions
from runs.definitions import InvalidInput, WorkflowDefinitionError, get_workflow
from runs.models import Run, Step, StepStatus, TriggerEvent
from runs.transitions import UNFINISHED_RUN_STATUSES, step_lock_keys


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
                steps = Step.objects.bulk_create(build_steps(run))
                wake_on_commit(lane=steps[0].lane)
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
    """Start a run of a registered workflow, in one transaction: its input validated, its steps
    created with everything known at start resolved (lane, tool, lock policy, retry budget, and
    the first step's lock keys), the first step ready. The dispatcher is woken on commit.

    Raises UnknownWorkflow, InvalidInput (nothing stored), QuotaExceeded or
    TriggerPayloadMismatch.
    """
    definition = get_workflow(workflow)
    input = definition.validate_input(input)
    try:
        first_locks = step_lock_keys(workflow=workflow, step_key=definition.steps[0].key, context=input)
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
    return start


def run_cancel(*, run: Run, actor: str, reason: str = "cancelled") -> bool:
    """Cancel an unfinished run (see ``transitions.run_cancel``). False when already finished."""
    with transaction.atomic():
        return transitions.run_cancel(run=run, actor=actor, reason=reason)


def run_cancel_by_id(*, run_id: str, actor: str, reason: str) -> bool:
    run = Run.objects.filter(pk=run_id).first()
    return run is not None and run_cancel(run=run, actor=actor, reason=reason)


# The transitions other apps (approvals) move parked steps with.
step_resume = transitions.step_resume
step_fail = transitions.step_fail
run_rewind = transitions.run_rewind
step_await_approval = transitions.step_await_approval


def step_outputs(run: Run, before_position: int | None = None) -> dict[str, Any]:
    """Outputs of the run's succeeded steps, by step key."""
    steps = Step.objects.filter(run=run, status=StepStatus.SUCCEEDED)
    if before_position is not None:
        steps = steps.filter(position__lt=before_position)
    return dict(steps.order_by("position").values_list("key", "output"))


def step_checkpoint(*, step: Step, lease: LeaseGrant, data: Any) -> None:
    """Save a step's progress, only while its lease is live (a fenced write)."""
    with fenced_write(tenant_id=step.tenant_id, key=lease.key, token=lease.token, actor=f"step:{step.pk}"):
        Step.objects.filter(pk=step.pk).update(checkpoint=data, updated_at=timezone.now())
