"""An admission round racing a cancel of the run it is admitting ends with the run cancelled and
nothing of it leased or holding a lease, whichever commits first; the round's row locks skip a
step another transaction holds. Real PostgreSQL, real threads."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import pytest
from django.db import connection, connections, transaction
from django.db.transaction import TransactionManagementError

from core import rawsql
from core.models import Lease, Tenant, TenantQuota
from runs.dispatch import dispatch_round
from runs.invariants import check_invariants
from runs.locking import ready_steps_lock
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_cancel, run_start
from tests.approvals.helpers import sent_to_workers
from tests.concurrency import held_meanwhile, run_concurrently

pytestmark = pytest.mark.django_db(transaction=True)

TRIALS = 20


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
        assert cancelled is True, cancelled  # the cancel goes through, before or after the round
        step = Step.objects.get(run=run)
        assert step.status == StepStatus.CANCELLED, [a.step_id for a in admitted]
        assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED
        assert not Lease.objects.filter(key=f"step:{step.pk}", released_at__isnull=True).exists()
    connections.close_all()
    sent_to_workers()  # what a round sent is taken off the queues, not left to later tests
    assert check_invariants() == []


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
def test_a_rounds_row_locks_skip_a_held_step_and_one_no_longer_ready(acme: Tenant, prepared: bool) -> None:
    held, free, cancelled = (
        Step.objects.get(run=run_start(tenant=acme, workflow="bench.noop", input={}, actor="bot").run)
        for _ in range(3)
    )
    Step.objects.filter(pk=cancelled.pk).update(status=StepStatus.CANCELLED)
    holding = held_meanwhile("SELECT id FROM runs_step WHERE id = %s FOR UPDATE", [held.pk])
    preparing = rawsql.prepared_statements() if prepared else nullcontext()
    with holding, preparing, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = '2s'")  # a wait for the held row fails the test
        assert ready_steps_lock([held.pk, free.pk, cancelled.pk]) == {free.pk}
    with pytest.raises(TransactionManagementError):
        ready_steps_lock([free.pk])  # outside a transaction the lock would end with the statement
