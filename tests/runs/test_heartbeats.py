"""Heartbeats: one watcher thread per process renews the leases of every step running in it
and stops the steps past their timeout, each on its own schedule."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from core.leases import LeaseGrant
from core.models import Lease, Tenant, TenantQuota
from runs.context import StepContext
from runs.definitions import workflow
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.heartbeat import PASSED_OVER_RETRY_SECONDS, next_beat_in
from runs.models import Run, RunStatus, StepStatus
from runs.services import run_start
from tests.concurrency import run_concurrently

pytestmark = pytest.mark.both_dialects

outlives = workflow("test.outlives_its_lease", description="works three times as long as its lease")


@outlives.step(lane="read", lease_seconds=0.5, max_attempts=1)
def work_past_the_lease(ctx: StepContext) -> dict[str, Any]:
    time.sleep(1.5)  # never calls ctx: only the background heartbeat keeps the lease
    return {"slept": 1.5}


hangs = workflow("test.hangs_past_its_timeout", description="sleeps past its timeout")


@hangs.step(lane="read", lease_seconds=0.5, timeout_seconds=0.8, max_attempts=1)
def hang(ctx: StepContext) -> dict[str, Any]:
    time.sleep(2.0)
    return {"late": True}


CAPS = {"global": 100, "tenant_default": 100, "workflow": {}, "lane": {}, "tool": {}}


@pytest.mark.django_db(transaction=True)
def test_steps_running_side_by_side_keep_their_leases_while_one_beside_them_times_out(acme: Tenant) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=100)
    long_runs = [run_start(tenant=acme, workflow=outlives.key, input={}, actor="t").run for _ in range(3)]
    hung = run_start(tenant=acme, workflow=hangs.key, input={}, actor="t").run
    with override_settings(RUNWARDEN_CAPS=CAPS):
        admitted = dispatch_round()
    assert len(admitted) == 4

    # Four steps at once on threads of this process, as the embedded worker runs them.
    outcomes = run_concurrently(
        lambda i: step_execute(step_id=admitted[i].step_id, token=admitted[i].token), len(admitted)
    )
    by_run = {
        Run.objects.get(steps__id=a.step_id).pk: outcome
        for a, outcome in zip(admitted, outcomes, strict=True)
    }

    for run in long_runs:
        assert by_run[run.pk] == "succeeded", by_run
        run.refresh_from_db()
        step = run.steps.get()
        assert (run.status, step.status, step.attempt) == (RunStatus.SUCCEEDED, StepStatus.SUCCEEDED, 1)
        lease = Lease.objects.get(tenant=acme, key=f"step:{step.pk}")
        # Renewed in the background, more than once, long after its lease would have run out.
        assert (lease.renewed_at - lease.acquired_at).total_seconds() >= 1.0, lease
    assert by_run[hung.pk] == "timed-out", by_run
    hung.refresh_from_db()
    step = hung.steps.get()
    assert (hung.status, step.status) == (RunStatus.FAILED, StepStatus.FAILED)
    assert "timed out after 0.8s" in step.error


def test_a_lease_a_renewal_passed_over_is_tried_again_well_before_it_runs_out() -> None:
    # A renewal passes over a lease a write has locked, leaving its old expiry: the next beat
    # comes soon, not a whole interval later (and never later than a third of its time left).
    now = timezone.now()

    def grant(seconds_left: float) -> LeaseGrant:
        return LeaseGrant(1, 1, "step:1", 1, now, now + timedelta(seconds=seconds_left))

    assert next_beat_in(10.0, [grant(30), grant(20)]) == PASSED_OVER_RETRY_SECONDS
    assert 0.15 <= next_beat_in(10.0, [grant(30), grant(0.6)]) <= 0.2, "a third of what little is left"
    assert next_beat_in(10.0, [grant(30)]) == 10.0, "renewed: a whole interval"
    assert next_beat_in(10.0, [grant(-1)]) == 0.05, "one already out: beat at once, and find it lost"
