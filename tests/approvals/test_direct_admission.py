"""An approval hands its resumed step straight to a worker (core.direct_admission): admitted by
the deciding process right after the commit, with no dispatcher round, only where a round
would admit it; else the dispatcher is woken. Real PostgreSQL and Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from approvals.models import ApprovalRequest
from core import after_response, rawsql, wakeups, workers
from core.models import Lease, Tenant, TenantQuota, User
from core.workers import POOLS_KEY
from runs import dispatch
from runs.executor import step_execute
from runs.invariants import check_invariants
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_cancel, run_start
from tests.approvals.helpers import sent_to_workers, waiting_followup
from tests.concurrency import run_concurrently
from tests.conftest import bearer_client
from tests.wakes import wake_marks_cleared, woken

pytestmark = pytest.mark.django_db(transaction=True)

TRIALS = 25


@pytest.fixture(autouse=True)
def quiet_broker() -> Iterator[None]:
    """No worker pools announced (caps alone decide), no wake-up pending, no task queued."""
    wake_marks_cleared(POOLS_KEY, wakeups.WAKE_KEY)
    workers._last_read = None  # nor this process's second-old view of them
    sent_to_workers()
    yield
    wake_marks_cleared(wakeups.WAKE_KEY)


def approve(user: User, request: ApprovalRequest) -> None:
    response = bearer_client(user).post(
        f"/api/v1/approvals/{request.pk}/approve",
        data=json.dumps({"comment": ""}),
        content_type="application/json",
        headers={"If-Match": f'"{request.version}"'},
    )
    assert response.status_code == 200, response.content


def test_an_approval_hands_its_step_to_a_worker_without_a_round(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    """The send step's lane (external) has a cap of 5, below the 8 shards' headroom: it is
    admitted under the whole admission lock, exactly, as a round would."""
    request = waiting_followup(sandbox_acme)
    woken()
    approve(acme_operator, request)
    step = Step.objects.get(pk=request.step_id)
    assert step.status == StepStatus.LEASED  # admitted by the deciding process itself
    sent = sent_to_workers()
    assert sent == [(step.pk, step.lease_token)]  # on its lane's queue
    assert not woken()  # no round was asked for
    assert step_execute(step_id=step.pk, token=sent[0][1]) == "succeeded"  # as a worker takes it
    assert Run.objects.get(pk=request.run_id).status == RunStatus.SUCCEEDED
    assert check_invariants() == []


def test_a_step_that_does_not_fit_now_stays_ready_and_wakes_the_dispatcher(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    request = waiting_followup(sandbox_acme)
    TenantQuota.objects.filter(tenant=sandbox_acme).update(caps={"lane": {"external": 0}})
    woken()
    approve(acme_operator, request)  # the tenant's sends are paused: no room in its lane
    assert Step.objects.get(pk=request.step_id).status == StepStatus.READY
    assert sent_to_workers() == []
    assert woken()  # the round decides (and finds the same)
    assert dispatch.dispatch_round() == []
    TenantQuota.objects.filter(tenant=sandbox_acme).update(caps={})
    assert [a.step_id for a in dispatch.dispatch_round()] == [request.step_id]


def test_deferred_work_waits_for_the_answer_inside_a_request_and_runs_at_once_outside() -> None:
    ran: list[str] = []
    after_response.after_response(lambda: ran.append("outside"))
    assert ran == ["outside"]
    after_response._request_started()
    try:
        after_response.after_response(lambda: ran.append("first"))
        after_response.after_response(lambda: 1 / 0)  # a failure is logged; the rest still runs
        after_response.after_response(lambda: ran.append("second"))
        assert ran == ["outside"]
    finally:
        after_response._request_finished()
    assert ran == ["outside", "first", "second"]
    after_response._request_started()
    after_response.after_response(lambda: ran.append("left"))
    after_response._request_started()  # the last request's end never came to this thread
    after_response._request_finished()
    assert ran == ["outside", "first", "second", "left"]  # run, not dropped


def ready_step(tenant: Tenant) -> Step:
    run = run_start(tenant=tenant, workflow="bench.noop", input={}, actor="bot").run
    return Step.objects.get(run=run)


def live_step_leases(step: Step) -> int:
    return Lease.objects.filter(key=f"step:{step.pk}", released_at__isnull=True).count()


def admit_or_round(step: Step, i: int) -> object:
    return dispatch.admit_directly(step.pk) if i == 0 else dispatch.dispatch_round()


def admit_or_cancel(step: Step, run: Run, i: int) -> object:
    if i == 0:
        return dispatch.admit_directly(step.pk)
    return run_cancel(run=run, actor="operator", reason="race")


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
def test_a_direct_admission_takes_its_shard_in_the_round_trip_that_reads_the_room(
    acme: Tenant, prepared: bool
) -> None:
    """A shard of the admission lock, the room, the step's own candidacy and its lease, in
    three round trips: the shard's statement goes first in the room's. As a web request's
    thread sends them (prepared, once prepared) and plainly."""
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=100)
    with rawsql.prepared_statements() if prepared else nullcontext():
        assert dispatch.admit_directly(ready_step(acme).pk)  # its statements prepared, if so
        step = ready_step(acme)
        with CaptureQueriesContext(connection) as captured:
            assert dispatch.admit_directly(step.pk)
    statements = [q["sql"] for q in captured.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]
    assert len(statements) == 3, statements
    shard, room = statements[0].split("; ", 1)
    assert shard.startswith("SELECT CASE WHEN EXISTS") and "pg_try_advisory_xact_lock" in shard
    assert room.startswith("EXECUTE") if prepared else "core_tenantquota" in room
    assert Step.objects.get(pk=step.pk).status == StepStatus.LEASED
    assert (step.pk, Step.objects.get(pk=step.pk).lease_token) in sent_to_workers()


def test_a_direct_admission_racing_a_round_admits_the_step_once(acme: Tenant) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=100)
    for _ in range(TRIALS):
        step = ready_step(acme)
        direct, by_round = run_concurrently(partial(admit_or_round, step), 2)
        assert not isinstance(direct, BaseException) and not isinstance(by_round, BaseException)
        admissions = int(direct) + sum(1 for a in by_round if a.step_id == step.pk)
        assert admissions == 1, (direct, by_round)
        assert Step.objects.get(pk=step.pk).status == StepStatus.LEASED
        assert live_step_leases(step) == 1
    sent_to_workers()
    assert check_invariants() == []


def test_a_direct_admission_racing_a_cancel_leaves_nothing_running(acme: Tenant) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=100)
    for _ in range(TRIALS):
        step = ready_step(acme)
        run = Run.objects.get(pk=step.run_id)
        admitted, cancelled = run_concurrently(partial(admit_or_cancel, step, run), 2)
        assert cancelled is True, cancelled  # a cancel always wins over an admission in flight
        assert not isinstance(admitted, BaseException), admitted
        assert Step.objects.get(pk=step.pk).status == StepStatus.CANCELLED
        assert live_step_leases(step) == 0  # an admission that won first was revoked
    connections.close_all()
    sent_to_workers()  # what the admissions sent finds its step cancelled
    assert check_invariants() == []
