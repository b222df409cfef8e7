"""The dispatcher: decides which ready steps may run now, and hands them to Celery.

One round:
1. picks candidates fairly: per tenant, its oldest ready steps, at most ``weight`` × ``per_tenant``
   of them, interleaved round-robin (one flooding tenant cannot push another's first step past
   this round);
2. for each, in the round's transaction: locks the step row (``FOR UPDATE SKIP LOCKED``), grants
   the step lease (fencing token), takes its entity locks (all or none) and a seat in every
   concurrency scope (all or none) — a step with no room stays ready for a later round;
3. after commit, enqueues one task per admitted step on its lane's queue.

Rounds run on a short beat and are kicked when work becomes ready; the database says what
is ready, so a lost kick or a lost Celery message only delays work. Only one round runs at a
time (a transaction-scoped advisory lock): rounds in parallel would only contend on the same
rows and could take entity locks in crossing orders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from core import metrics
from core.leases import LeaseGrant, LeaseHeld, lease_acquire, live_leases_filter, locks_acquire
from core.models import Lease
from core.slots import NoRoom, admission_scopes, slots_claim
from runs.definitions import StepSpec, UnknownWorkflow, get_workflow
from runs.models import Step, StepStatus
from runs.services import fingerprint, run_cancel_by_id, step_lock_context

logger = logging.getLogger(__name__)

DISPATCH_LOCK_ID = 7_411_001  # pg advisory lock key of the dispatcher


@dataclass(frozen=True)
class Admission:
    step_id: int
    token: int
    lane: str


class _NotAdmitted(Exception):
    """The step stays ready; with ``cancel_reason`` its run gives way and is cancelled."""

    def __init__(self, cancel_reason: str = "") -> None:
        super().__init__(cancel_reason)
        self.cancel_reason = cancel_reason


@dataclass
class _RoundEffects:
    """What to do once the round commits (callbacks registered in a savepoint that rolls back
    would be discarded with it)."""

    cancel: list[tuple[str, str]]  # (run_id, reason)


def fair_candidates(*, limit: int, per_tenant: int = 4, now: datetime | None = None) -> list[int]:
    """Ready step ids, interleaved across tenants by weight (round-robin)."""
    now = now or timezone.now()
    adapt = connection.ops.adapt_datetimefield_value
    sql = """
        SELECT id FROM (
            SELECT s.id, s.tenant_id,
                   ROW_NUMBER() OVER (PARTITION BY s.tenant_id ORDER BY s.id) AS rn,
                   COALESCE(q.weight, 1) AS weight
            FROM runs_step s
            LEFT JOIN core_tenantquota q ON q.tenant_id = s.tenant_id
            WHERE s.status = 'ready' AND (s.available_at IS NULL OR s.available_at <= %s)
        ) ranked
        WHERE rn <= weight * %s
        ORDER BY (rn - 1) / weight, tenant_id, id
        LIMIT %s
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [adapt(now), per_tenant, limit])
        return [row[0] for row in cursor.fetchall()]


def _take_dispatch_lock() -> bool:
    if connection.vendor != "postgresql":
        return True  # SQLite serialises writers already
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [DISPATCH_LOCK_ID])
        return bool(cursor.fetchone()[0])


def _admit(step: Step, spec: StepSpec, effects: _RoundEffects) -> Admission:
    """Lease, locks and seats for one step, in the caller's savepoint; raises _NotAdmitted."""
    run = step.run
    lease_seconds = spec.lease_seconds or settings.RUNWARDEN_DEFAULT_LEASE_SECONDS
    holder = f"{run.id}:{step.key}"
    metadata = {"run_id": run.id, "step_id": step.pk, "step_key": step.key}
    grant = lease_acquire(
        tenant_id=run.tenant_id, key=f"step:{step.pk}", holder=holder, ttl=lease_seconds, metadata=metadata
    )
    if grant is None:
        # Never start a retry while a live lease still owns the step.
        metrics.RETRIES_BLOCKED_BY_LEASE.inc()
        raise _NotAdmitted
    context = step_lock_context(step)
    lock_keys = spec.lock_keys(context)
    if lock_keys:
        _take_entity_locks(step, spec, lock_keys, holder, lease_seconds, metadata, effects)
    try:
        slots_claim(
            grant=grant,
            scopes=admission_scopes(
                tenant_id=run.tenant_id, workflow=run.workflow, lane=spec.lane, tool=spec.tool
            ),
        )
    except NoRoom:
        raise _NotAdmitted from None
    Step.objects.filter(pk=step.pk).update(
        status=StepStatus.LEASED,
        attempt=step.attempt + 1,
        lease_token=grant.token,
        lock_keys=lock_keys,
        input_hash=step.input_hash or fingerprint(context),
        updated_at=timezone.now(),
    )
    return Admission(step_id=step.pk, token=grant.token, lane=spec.lane)


def _take_entity_locks(
    step: Step,
    spec: StepSpec,
    keys: list[str],
    holder: str,
    ttl: float,
    metadata: dict[str, Any],
    effects: _RoundEffects,
) -> list[LeaseGrant]:
    run = step.run
    # At admission "wait" means: stay ready and try again next round (no worker sits waiting).
    policy = "skip" if spec.lock_policy == "wait" else spec.lock_policy
    preempted: list[str] = []
    if policy == "cancel_in_progress":
        preempted = [
            rid
            for rid in Lease.objects.filter(live_leases_filter(), tenant_id=run.tenant_id, key__in=keys)
            .values_list("metadata__run_id", flat=True)
            .distinct()
            if rid and rid != run.id
        ]
    try:
        with metrics.LOCK_WAIT_SECONDS.time():
            grants = locks_acquire(
                tenant_id=run.tenant_id, keys=keys, holder=holder, ttl=ttl, policy=policy, metadata=metadata
            )
    except LeaseHeld:
        metrics.LOCK_CONFLICTS.inc()
        if spec.lock_policy == "skip":
            raise _NotAdmitted("skipped: an entity it needs is locked by another run") from None
        if spec.lock_policy == "cancel_newest":
            raise _NotAdmitted("cancelled: an older run holds the entity (cancel_newest)") from None
        raise _NotAdmitted from None
    effects.cancel.extend(
        (rid, f"cancelled: preempted by {run.id} (cancel_in_progress)") for rid in preempted
    )
    return grants


def dispatch_round(*, limit: int | None = None) -> list[Admission]:
    """Admit what may run now and enqueue it. Returns the admissions (empty if another round runs)."""
    from runs.tasks import enqueue_step

    limit = limit or settings.RUNWARDEN_DISPATCH_BATCH
    admitted: list[Admission] = []
    effects = _RoundEffects(cancel=[])
    with transaction.atomic():
        if not _take_dispatch_lock():
            return []
        for step_id in fair_candidates(limit=limit):
            step = (
                Step.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("run")
                .filter(pk=step_id, status=StepStatus.READY)
                .first()
            )
            if step is None:
                continue
            try:
                spec = get_workflow(step.run.workflow).spec(step.key)
            except UnknownWorkflow:
                logger.error("step %s belongs to an unknown workflow %s", step.pk, step.run.workflow)
                continue
            try:
                with transaction.atomic():
                    admitted.append(_admit(step, spec, effects))
            except _NotAdmitted as refused:
                if refused.cancel_reason:
                    effects.cancel.append((step.run_id, refused.cancel_reason))
        for admission in admitted:
            transaction.on_commit(partial(enqueue_step, admission.step_id, admission.token, admission.lane))
        for run_id, reason in effects.cancel:
            transaction.on_commit(partial(run_cancel_by_id, run_id=run_id, actor="dispatcher", reason=reason))
    return admitted


def dispatch_until_idle(*, max_rounds: int = 20) -> int:
    total = 0
    for _ in range(max_rounds):
        admitted = dispatch_round()
        total += len(admitted)
        if not admitted:
            break
    return total
