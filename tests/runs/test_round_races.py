"""An admission round racing a cancel of the run it is admitting: the cancel always wins, and
nothing of the run is left leased or holding a lease. Real PostgreSQL, real threads."""

from __future__ import annotations

from functools import partial

import pytest
from django.db import connections

from core.models import Lease, Tenant, TenantQuota
from runs.dispatch import dispatch_round
from runs.invariants import check_invariants
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_cancel, run_start
from tests.approvals.helpers import sent_to_workers
from tests.concurrency import run_concurrently

pytestmark = pytest.mark.django_db(transaction=True)

TRIALS = 30


def round_or_cancel(run: Run, i: int) -> object:
    if i == 0:
        return dispatch_round()
    return run_cancel(run=run, actor="operator", reason="race")


def test_a_round_racing_a_cancel_never_leaves_the_cancelled_step_leased(acme: Tenant) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=100)
    for _ in range(TRIALS):
        run = run_start(tenant=acme, workflow="bench.noop", input={}, actor="bot").run
        admitted, cancelled = run_concurrently(partial(round_or_cancel, run), 2)
        assert not isinstance(admitted, BaseException), admitted
        assert cancelled is True, cancelled  # a cancel always wins over an admission in flight
        step = Step.objects.get(run=run)
        assert step.status == StepStatus.CANCELLED, [a.step_id for a in admitted]
        assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED
        assert not Lease.objects.filter(key=f"step:{step.pk}", released_at__isnull=True).exists()
    connections.close_all()
    sent_to_workers()  # what a round sent finds its step cancelled
    assert check_invariants() == []
