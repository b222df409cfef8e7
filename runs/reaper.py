"""The reaper: admissions whose lease ran out, and tasks the broker may have lost.

- A step admitted but never picked up (its lease ran out while ``leased``) goes back to
  ready with its attempt count unchanged: it never started, so it used no attempt.
- A step whose worker vanished mid-run (``running``, lease gone) goes back to ready for its
  next attempt, fails on its last one, or — when it proposed an effect with no recorded
  outcome — waits in ``conflict``, because the effect may have happened and only a human can
  tell.
- A step still ``leased`` some seconds after its task was sent is sent again with the same
  token (Redis may have lost it); a duplicate delivery exits without running.

Run by the active dispatcher, so it never competes with a second reaper.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from core.leases import leases_release, live_leases_filter
from core.models import Lease
from runs import transitions
from runs.models import EffectStatus, SideEffect, Step, StepStatus
from runs.queueing import enqueue_step


def reap_expired_steps(*, now: datetime | None = None, limit: int = 200) -> dict[str, int]:
    """Return admissions whose lease is gone; counts by outcome."""
    now = now or timezone.now()
    live_lease = Lease.objects.filter(
        live_leases_filter(now), pk=OuterRef("lease_id"), token=OuterRef("lease_token")
    )
    orphan_ids = list(
        Step.objects.filter(status__in=transitions.ADMITTED)
        .filter(~Exists(live_lease))
        .order_by("pk")
        .values_list("pk", flat=True)[:limit]
    )
    counts = {"requeued": 0, "retried": 0, "conflict": 0, "failed": 0}
    for step_id in orphan_ids:
        outcome = _reap_one(step_id, now)
        if outcome:
            counts[outcome] += 1
    return counts


def _reap_one(step_id: int, now: datetime) -> str | None:
    with transaction.atomic():
        step = (
            Step.objects.select_for_update(skip_locked=True, no_key=True, of=("self",))
            .filter(pk=step_id, status__in=transitions.ADMITTED)
            .first()
        )
        if step is None:
            return None
        still_live = Lease.objects.filter(
            live_leases_filter(now), pk=step.lease_id or 0, token=step.lease_token or 0
        ).exists()
        if still_live:
            return None  # renewed since we looked
        leases_release(transitions.admission_grants(step), now=now)
        if step.status == StepStatus.LEASED:
            transitions.step_requeue(step=step, actor="reaper", verb="step_requeued", now=now)
            return "requeued"
        pending = SideEffect.objects.filter(step=step, status=EffectStatus.PROPOSED).first()
        if pending is not None:
            transitions.step_conflict(
                step=step,
                kind="lease_expired_with_pending_effect",
                error="the worker vanished while an effect was in flight: did it happen?",
                now=now,
                effect=pending,
                current={
                    "effect": pending.idempotency_key,
                    "status": pending.status,
                    "request": pending.request,
                },
            )
            return "conflict"
        if step.attempt >= step.max_attempts:
            transitions.step_fail(
                step=step,
                actor="reaper",
                reason="lease expired on the last attempt",
                from_statuses=[StepStatus.RUNNING],
                now=now,
            )
            return "failed"
        transitions.step_requeue(step=step, actor="reaper", verb="step_lease_expired", now=now)
        return "retried"


def resend_unstarted(*, now: datetime | None = None, limit: int = 200) -> int:
    """Send again the tasks of steps admitted a while ago and still not picked up."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.RUNWARDEN_RESEND_AFTER_SECONDS)
    stale = list(
        Step.objects.filter(status=StepStatus.LEASED, enqueued_at__lt=cutoff)
        .order_by("pk")
        .values_list("pk", "lease_token", "lane")[:limit]
    )
    resent = 0
    for step_id, token, lane in stale:
        assert token is not None  # a leased step always has its token
        # Compare-and-set on the token: a step re-admitted meanwhile is not sent twice.
        if Step.objects.filter(pk=step_id, status=StepStatus.LEASED, lease_token=token).update(
            enqueued_at=now
        ):
            enqueue_step(step_id, token, lane)
            resent += 1
    return resent
