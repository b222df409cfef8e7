"""Running one step on a worker, finishing it, and reaping steps whose worker vanished.

Who runs a step is decided by its lease, never by the broker: a task carries the fencing
token the dispatcher granted, and ``step_execute`` starts only if that token still owns the
step. A redelivered or duplicated task therefore exits without running, and every write a
step makes back to Runwarden is fenced by the same token.
"""

from __future__ import annotations

import logging
import traceback
from datetime import timedelta
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

# Hooks the approvals app fills to turn collisions into conflict artifacts (runs never imports it).
CONFLICT_HOOKS: list[Any] = []


def _report_conflict(kind: str, **details: Any) -> None:
    for hook in CONFLICT_HOOKS:
        hook(kind=kind, **details)


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


def step_execute(*, step_id: int, token: int) -> str:
    """Run one admitted step. Returns what happened (for logs and tests)."""
    step = Step.objects.select_related("run").filter(pk=step_id).first()
    if step is None:
        return "missing"
    run = step.run
    try:
        spec = get_workflow(run.workflow).spec(step.key)
    except UnknownWorkflow as exc:
        _finish_failed(step, token, f"{exc}", retry=None)
        return "failed"

    now = timezone.now()
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
            verdict = None
            if spec.approval is not None:
                outputs = step_outputs(run, before_position=step.position)
                draft = list(outputs.values())[-1] if outputs else None
                verdict = gates.get_gate().check(run=run, step=step, spec=spec, draft=draft)
                if verdict.state != "approved":
                    raise _Parked(verdict)
    except StaleToken:
        return "stale"  # the lease expired before the task ran; the reaper re-dispatches it
    except _Parked as parked:
        return _park(step, token, parked.verdict)
    except gates.NoGate as exc:
        _finish_failed(step, token, str(exc), retry=None)
        return "failed"

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
        _finish_conflict(ctx, "lease_expired_with_pending_effect", str(exc), effect=exc.effect)
        return "conflict"
    except EffectRequestMismatch as exc:
        _finish_failed(step, token, str(exc), retry=None, ctx=ctx)
        return "failed"
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return _finish_failed(step, token, detail, retry=spec, ctx=ctx)
    return _finish_succeeded(ctx, output)


class _Parked(Exception):
    def __init__(self, verdict: gates.GateVerdict) -> None:
        super().__init__(verdict.state)
        self.verdict = verdict


def _release_all(ctx_or_step: StepContext | Step, token: int) -> None:
    if isinstance(ctx_or_step, StepContext):
        for grant in ctx_or_step.grants():
            lease_release(grant=grant)
        return
    step = ctx_or_step
    lease, locks = _grants_for(step, token)
    for grant in (lease, *locks):
        lease_release(grant=grant)


def _park(step: Step, token: int, verdict: gates.GateVerdict) -> str:
    """Gated step without a valid approval: wait (lease released) or fail if rejected."""
    if verdict.state == "rejected":
        _finish_failed(step, token, f"rejected: {verdict.reason}", retry=None)
        return "rejected"
    now = timezone.now()
    try:
        with fenced_write(tenant_id=step.tenant_id, key=f"step:{step.pk}", token=token, actor="executor"):
            Step.objects.filter(pk=step.pk).update(status=StepStatus.WAITING_APPROVAL, updated_at=now)
            Run.objects.filter(pk=step.run_id, status__in=[RunStatus.PENDING, RunStatus.RUNNING]).update(
                status=RunStatus.WAITING_APPROVAL, updated_at=now
            )
            _release_all(step, token)
            core_services.event_record(
                tenant=step.tenant_id,
                subject=f"run:{step.run_id}",
                verb="step_waiting_approval",
                actor="executor",
                payload={"step": step.key, "approval_id": verdict.approval_id},
            )
    except StaleToken:
        return "stale"
    return "waiting_approval"


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
            _release_all(ctx, ctx.lease.token)
            core_services.event_record(
                tenant=step.tenant_id,
                subject=f"run:{run.id}",
                verb="step_succeeded" if following else "run_succeeded",
                actor=f"step:{step.key}",
                payload={"step": step.key, "attempt": step.attempt},
            )
            if not following:
                outbox.outbox_enqueue(
                    tenant_id=step.tenant_id,
                    key=f"{run.id}:succeeded",
                    kind="run_finished",
                    payload={"run_id": run.id, "workflow": run.workflow, "status": "succeeded"},
                )
    except StaleToken:
        _report_conflict("stale_token_write", step=step, token=ctx.lease.token, output=output)
        return "stale"
    from runs.tasks import kick_dispatcher

    kick_dispatcher()
    return "succeeded"


def _finish_failed(
    step: Step, token: int, error: str, *, retry: StepSpec | None, ctx: StepContext | None = None
) -> str:
    """Schedule a retry with backoff (same step, same idempotency keys) or fail the run."""
    now = timezone.now()
    retrying = retry is not None and step.attempt < retry.retry.max_attempts
    try:
        with fenced_write(
            tenant_id=step.tenant_id, key=f"step:{step.pk}", token=token, actor=f"step:{step.pk}"
        ):
            if retrying:
                assert retry is not None
                delay = retry.retry.delay(step.attempt)
                Step.objects.filter(pk=step.pk).update(
                    status=StepStatus.READY,
                    error=error,
                    available_at=now + timedelta(seconds=delay),
                    updated_at=now,
                )
            else:
                Step.objects.filter(pk=step.pk).update(
                    status=StepStatus.FAILED, error=error, finished_at=now, updated_at=now
                )
                Run.objects.filter(pk=step.run_id).exclude(status=RunStatus.CANCELLED).update(
                    status=RunStatus.FAILED, finished_at=now, updated_at=now
                )
            _release_all(ctx or step, token)
            core_services.event_record(
                tenant=step.tenant_id,
                subject=f"run:{step.run_id}",
                verb="step_retry_scheduled" if retrying else "run_failed",
                actor=f"step:{step.key}",
                payload={"step": step.key, "attempt": step.attempt, "error": error[:500]},
            )
    except StaleToken:
        return "stale"
    return "retrying" if retrying else "failed"


def _finish_conflict(ctx: StepContext, kind: str, error: str, *, effect: SideEffect | None = None) -> None:
    step = ctx.step
    now = timezone.now()
    try:
        with fenced_write(
            tenant_id=step.tenant_id, key=ctx.lease.key, token=ctx.lease.token, actor=f"step:{step.pk}"
        ):
            _mark_conflict(step, kind, error, now, effect=effect)
            _release_all(ctx, ctx.lease.token)
    except StaleToken:
        pass


def _mark_conflict(step: Step, kind: str, error: str, now: Any, *, effect: SideEffect | None = None) -> None:
    """The step waits in ``conflict`` for a reviewer (call inside a transaction)."""
    Step.objects.filter(pk=step.pk).update(status=StepStatus.CONFLICT, error=error, updated_at=now)
    Run.objects.filter(pk=step.run_id).exclude(status=RunStatus.CANCELLED).update(
        status=RunStatus.CONFLICT, updated_at=now
    )
    core_services.event_record(
        tenant=step.tenant_id,
        subject=f"run:{step.run_id}",
        verb="step_conflict",
        actor="executor",
        payload={"step": step.key, "kind": kind, "effect": effect.idempotency_key if effect else None},
    )
    _report_conflict(kind, step=step, effect=effect, error=error)


def reap_expired_steps(*, now: Any = None, limit: int = 100) -> dict[str, int]:
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


def _reap_one(step_id: int, now: Any) -> str | None:
    with transaction.atomic():
        step = (
            Step.objects.select_for_update(skip_locked=True)
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
            _mark_conflict(
                step,
                "lease_expired_with_pending_effect",
                "the worker vanished while an effect was in flight",
                now,
                effect=pending,
            )
            return "conflict"
        try:
            spec = get_workflow(step.run.workflow).spec(step.key)
            max_attempts = spec.retry.max_attempts
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
        core_services.event_record(
            tenant=step.tenant_id,
            subject=f"run:{step.run_id}",
            verb=verb,
            actor="reaper",
            payload={"step": step.key, "attempt": step.attempt, "token": step.lease_token},
        )
    return outcome
