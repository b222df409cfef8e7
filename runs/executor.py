"""Running one step on a worker, finishing it, and reaping steps whose worker vanished.

Who runs a step is decided by its lease, never by the broker: a task carries the fencing
token the dispatcher granted, and ``step_execute`` starts only if that token still owns the
step. A redelivered or duplicated task therefore exits without running, and every write a
step makes back to Runwarden is fenced by the same token.

The ``_apply_*`` functions write one outcome; they expect to run inside a transaction that
holds the step's fence (``lease_fence`` or ``fenced_write``).
"""

from __future__ import annotations

import logging
import traceback
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import CharField, Exists, OuterRef, Value
from django.db.models.functions import Cast, Concat
from django.utils import timezone

from core import outbox
from core import services as core_services
from core.leases import (
    LeaseGrant,
    StaleToken,
    fenced_write,
    lease_fence,
    lease_release,
    lease_revoke,
    live_leases_filter,
)
from core.models import Lease
from runs import gates
from runs.context import Heartbeat, LeaseLost, RunCancelled, StepContext
from runs.definitions import StepSpec, UnknownWorkflow, get_workflow
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus
from runs.services import EffectRequestMismatch, EffectUnresolved, step_outputs

logger = logging.getLogger(__name__)


def _grants_for(step: Step, token: int) -> tuple[LeaseGrant, list[LeaseGrant]]:
    """The step's lease and its entity locks, as the worker needs them to renew and fence."""
    keys = [f"step:{step.pk}", *step.lock_keys]
    rows = {lease.key: lease for lease in Lease.objects.filter(tenant_id=step.tenant_id, key__in=keys)}

    def grant(lease: Lease) -> LeaseGrant:
        return LeaseGrant(
            lease.pk, lease.tenant_id, lease.key, lease.token, lease.acquired_at, lease.expires_at
        )

    step_lease = rows[f"step:{step.pk}"]
    if step_lease.token != token:
        raise StaleToken(step_lease.key, token)
    locks = [
        grant(rows[key])
        for key in step.lock_keys
        if key in rows and rows[key].metadata.get("step_id") == step.pk
    ]
    return grant(step_lease), locks


def _release(grants: list[LeaseGrant]) -> None:
    for grant in grants:
        lease_release(grant=grant)


def _event(step: Step, verb: str, actor: str, **payload: Any) -> None:
    core_services.event_record(
        tenant=step.tenant_id,
        subject=f"run:{step.run_id}",
        verb=verb,
        actor=actor,
        payload={"step": step.key, **payload},
    )


def step_execute(*, step_id: int, token: int) -> str:
    """Run one admitted step. Returns what happened (for logs and tests)."""
    step = Step.objects.select_related("run").filter(pk=step_id).first()
    if step is None:
        return "missing"
    run = step.run
    try:
        spec = get_workflow(run.workflow).spec(step.key)
    except UnknownWorkflow as exc:
        return _finish_failed(step, token, str(exc), retry=None)

    now = timezone.now()
    verdict = None
    try:
        with transaction.atomic():
            lease_fence(tenant_id=step.tenant_id, key=f"step:{step.pk}", token=token)
            claimed = Step.objects.filter(pk=step.pk, status=StepStatus.LEASED, lease_token=token).update(
                status=StepStatus.RUNNING, started_at=step.started_at or now, updated_at=now
            )
            if claimed != 1:
                return "not-ours"  # a duplicate delivery of a task already started
            Run.objects.filter(pk=run.pk, status=RunStatus.PENDING).update(
                status=RunStatus.RUNNING, started_at=now, updated_at=now
            )
            if spec.approval is not None:
                outputs = step_outputs(run, before_position=step.position)
                draft = list(outputs.values())[-1] if outputs else None
                verdict = gates.get_gate().check(run=run, step=step, spec=spec, draft=draft)
                # Parked in this same transaction: a decision that commits after it always
                # finds the step waiting, so it can never be missed.
                if verdict.state == "waiting":
                    _apply_park(step, token, verdict, now)
                    return "waiting_approval"
                if verdict.state == "rejected":
                    _apply_failed(step, token, f"rejected: {verdict.reason}", None, now)
                    return "rejected"
    except StaleToken:
        return "stale"  # the lease expired before the task ran; the reaper re-dispatches it
    except gates.NoGate as exc:
        return _finish_failed(step, token, str(exc), retry=None)

    step.refresh_from_db()
    lease, locks = _grants_for(step, token)
    ctx = StepContext(
        run=run,
        step=step,
        lease=lease,
        lease_seconds=spec.lease_seconds or settings.RUNWARDEN_DEFAULT_LEASE_SECONDS,
        input=dict(run.input),
        outputs=step_outputs(run, before_position=step.position),
        checkpoint_data=step.checkpoint,
        locks=locks,
        approval=verdict,
    )
    try:
        with Heartbeat(ctx):
            output = spec.body(ctx)
    except RunCancelled:
        return "cancelled"  # run_cancel already finished the step and revoked its leases
    except LeaseLost:
        return "lease-lost"  # a newer holder or the reaper owns the step now
    except EffectUnresolved as exc:
        return _finish_conflict(
            ctx,
            "lease_expired_with_pending_effect",
            str(exc),
            effect=exc.effect,
            current={"effect": exc.effect.idempotency_key, "status": exc.effect.status},
        )
    except gates.ApprovalNoLongerValid as exc:
        return _finish_conflict(
            ctx, "stale_approval", str(exc), approval_id=verdict.approval_id if verdict else None
        )
    except gates.EntityChanged as exc:
        return _finish_conflict(
            ctx,
            "entity_version_mismatch",
            str(exc),
            target_key=exc.key,
            current={"version": exc.actual},
            proposed={"expected_version": exc.expected, "changes": exc.proposed},
        )
    except EffectRequestMismatch as exc:
        return _finish_failed(step, token, str(exc), retry=None, grants=ctx.grants())
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return _finish_failed(step, token, detail, retry=spec, grants=ctx.grants())
    return _finish_succeeded(ctx, output)


def _apply_park(step: Step, token: int, verdict: gates.GateVerdict, now: datetime) -> None:
    """Gated step without a valid approval: wait, with every lease released."""
    Step.objects.filter(pk=step.pk).update(status=StepStatus.WAITING_APPROVAL, updated_at=now)
    Run.objects.filter(pk=step.run_id, status__in=[RunStatus.PENDING, RunStatus.RUNNING]).update(
        status=RunStatus.WAITING_APPROVAL, updated_at=now
    )
    _release([*_grants_for_release(step, token)])
    _event(step, "step_waiting_approval", "executor", approval_id=verdict.approval_id)


def _grants_for_release(step: Step, token: int) -> list[LeaseGrant]:
    lease, locks = _grants_for(step, token)
    return [lease, *locks]


def _apply_failed(step: Step, token: int, error: str, retry: StepSpec | None, now: datetime,
                  grants: list[LeaseGrant] | None = None) -> bool:  # fmt: skip
    """Retry with backoff (same step, same idempotency keys) or fail the run. True if retrying."""
    retrying = retry is not None and step.attempt < retry.retry.max_attempts
    if retrying:
        assert retry is not None
        delay = retry.retry.delay(step.attempt)
        Step.objects.filter(pk=step.pk).update(
            status=StepStatus.READY, error=error, available_at=now + timedelta(seconds=delay), updated_at=now
        )
    else:
        Step.objects.filter(pk=step.pk).update(
            status=StepStatus.FAILED, error=error, finished_at=now, updated_at=now
        )
        Run.objects.filter(pk=step.run_id).exclude(status=RunStatus.CANCELLED).update(
            status=RunStatus.FAILED, finished_at=now, updated_at=now
        )
    _release(grants if grants is not None else _grants_for_release(step, token))
    _event(
        step,
        "step_retry_scheduled" if retrying else "run_failed",
        f"step:{step.key}",
        attempt=step.attempt,
        error=error[:500],
    )
    return retrying


def apply_conflict(step: Step, kind: str, error: str, now: datetime, **details: Any) -> None:
    """The step waits in ``conflict`` for a reviewer (call inside a transaction)."""
    Step.objects.filter(pk=step.pk).update(status=StepStatus.CONFLICT, error=error, updated_at=now)
    Run.objects.filter(pk=step.run_id).exclude(status=RunStatus.CANCELLED).update(
        status=RunStatus.CONFLICT, updated_at=now
    )
    effect = details.get("effect")
    _event(step, "step_conflict", "executor", kind=kind, effect=effect.idempotency_key if effect else None)
    gates.report_conflict(kind, step=step, error=error, **details)


def _finish_succeeded(ctx: StepContext, output: Any) -> str:
    step, run = ctx.step, ctx.run
    now = timezone.now()
    try:
        with fenced_write(
            tenant_id=step.tenant_id, key=ctx.lease.key, token=ctx.lease.token, actor=f"step:{step.pk}"
        ):
            Step.objects.filter(pk=step.pk).update(
                status=StepStatus.SUCCEEDED, output=output, error="", finished_at=now, updated_at=now
            )
            following = Step.objects.filter(
                run=run, position=step.position + 1, status=StepStatus.PENDING
            ).update(status=StepStatus.READY, updated_at=now)
            if not following:
                Run.objects.filter(pk=run.pk, status=RunStatus.RUNNING).update(
                    status=RunStatus.SUCCEEDED, finished_at=now, updated_at=now
                )
                outbox.outbox_enqueue(
                    tenant_id=step.tenant_id,
                    key=f"{run.id}:succeeded",
                    kind="run_finished",
                    payload={"run_id": run.id, "workflow": run.workflow, "status": "succeeded"},
                )
            _release(ctx.grants())
            _event(
                step,
                "step_succeeded" if following else "run_succeeded",
                f"step:{step.key}",
                attempt=step.attempt,
            )
    except StaleToken:
        # A zombie: the step belongs to a newer holder now. The refusal is recorded as an event
        # by fenced_write; here it also becomes a conflict artifact for a reviewer to see.
        with transaction.atomic():
            gates.report_conflict("stale_token_write", step=step, token=ctx.lease.token, proposed=output)
        return "stale"
    from runs.tasks import kick_dispatcher

    kick_dispatcher()
    return "succeeded"


def _finish_failed(step: Step, token: int, error: str, *, retry: StepSpec | None,
                   grants: list[LeaseGrant] | None = None) -> str:  # fmt: skip
    try:
        with fenced_write(
            tenant_id=step.tenant_id, key=f"step:{step.pk}", token=token, actor=f"step:{step.pk}"
        ):
            retrying = _apply_failed(step, token, error, retry, timezone.now(), grants)
    except StaleToken:
        return "stale"
    if retrying:
        from runs.tasks import kick_dispatcher

        kick_dispatcher()
    return "retrying" if retrying else "failed"


def _finish_conflict(ctx: StepContext, kind: str, error: str, **details: Any) -> str:
    step = ctx.step
    try:
        with fenced_write(
            tenant_id=step.tenant_id, key=ctx.lease.key, token=ctx.lease.token, actor=f"step:{step.pk}"
        ):
            apply_conflict(step, kind, error, timezone.now(), **details)
            _release(ctx.grants())
    except StaleToken:
        return "stale"
    return "conflict"


def reap_expired_steps(*, now: datetime | None = None, limit: int = 100) -> dict[str, int]:
    """Steps whose lease expired (their worker died or stalled) go back to ready, with the
    attempt count kept, or to ``conflict`` when they proposed an effect without an outcome
    (it may have happened: a human decides). Returns counts by outcome."""
    now = now or timezone.now()
    live_step_lease = Lease.objects.filter(
        live_leases_filter(now),
        tenant_id=OuterRef("tenant_id"),
        key=Concat(Value("step:"), Cast(OuterRef("pk"), output_field=CharField())),
        token=OuterRef("lease_token"),
    )
    orphan_ids = list(
        Step.objects.filter(status__in=[StepStatus.LEASED, StepStatus.RUNNING])
        .annotate(live=Exists(live_step_lease))
        .filter(live=False)
        .order_by("pk")
        .values_list("pk", flat=True)[:limit]
    )
    counts = {"retried": 0, "conflict": 0, "failed": 0}
    for step_id in orphan_ids:
        outcome = _reap_one(step_id, now)
        if outcome:
            counts[outcome] += 1
    return counts


def _reap_one(step_id: int, now: datetime) -> str | None:
    with transaction.atomic():
        step = (
            Step.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("run")
            .filter(pk=step_id, status__in=[StepStatus.LEASED, StepStatus.RUNNING])
            .first()
        )
        if step is None:
            return None
        still_live = (
            step.lease_token is not None
            and Lease.objects.filter(
                live_leases_filter(now),
                tenant_id=step.tenant_id,
                key=f"step:{step.pk}",
                token=step.lease_token,
            ).exists()
        )
        if still_live:
            return None  # renewed since we looked
        lease_revoke(tenant_id=step.tenant_id, keys=step.lock_keys, now=now)
        pending = SideEffect.objects.filter(step=step, status=EffectStatus.PROPOSED).first()
        if pending is not None:
            apply_conflict(
                step,
                "lease_expired_with_pending_effect",
                "the worker vanished while an effect was in flight: did it happen?",
                now,
                effect=pending,
                current={
                    "effect": pending.idempotency_key,
                    "status": pending.status,
                    "request": pending.request,
                },
            )
            return "conflict"
        try:
            max_attempts = get_workflow(step.run.workflow).spec(step.key).retry.max_attempts
        except UnknownWorkflow:
            max_attempts = step.attempt
        if step.attempt >= max_attempts:
            Step.objects.filter(pk=step.pk).update(
                status=StepStatus.FAILED,
                error="lease expired on the last attempt",
                finished_at=now,
                updated_at=now,
            )
            Run.objects.filter(pk=step.run_id).exclude(status=RunStatus.CANCELLED).update(
                status=RunStatus.FAILED, finished_at=now, updated_at=now
            )
            verb, outcome = "run_failed", "failed"
        else:
            Step.objects.filter(pk=step.pk).update(status=StepStatus.READY, available_at=now, updated_at=now)
            verb, outcome = "step_lease_expired", "retried"
        _event(step, verb, "reaper", attempt=step.attempt, token=step.lease_token)
    return outcome
