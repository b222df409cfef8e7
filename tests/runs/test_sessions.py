"""Sessions (issue 9): runs of one conversation never interleave, in order, with a queue timeout
and an overflow policy; a waiting run holds nothing. In-process tests drive the real dispatcher
round and executor against PostgreSQL; the last test uses real worker and dispatcher processes.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone

from approvals.services import approval_decide
from core.models import Event, Lease, Tenant, User
from runs.dispatch import Admission, dispatch_round
from runs.executor import step_execute
from runs.invariants import check_invariants
from runs.models import Run, RunStatus, SessionState, Step, StepStatus
from runs.services import run_cancel, run_start
from runs.sessions import SessionOverflow, session_place
from tests.approvals.helpers import pending_request, pump
from tests.concurrency import run_concurrently
from tests.conftest import bearer_client
from tests.dialects import RACING_THREADS, REAL_WORKERS
from tests.runs.cluster import Cluster, wait_for

pytestmark = pytest.mark.both_dialects

UNFINISHED = ("pending", "running", "waiting_approval", "conflict")


def turn(tenant: Tenant, session: str, workflow: str = "test.chat_turn", **fields: object) -> Run:
    sequence = fields.pop("sequence", None)
    return run_start(
        tenant=tenant,
        workflow=workflow,
        input={"message": str(fields.get("message", "")), "work_seconds": fields.get("work_seconds", 0.0)},
        actor="t",
        session_key=session,
        sequence=sequence,  # type: ignore[arg-type]
    ).run


def assert_whole_runs_never_overlap(runs: list[Run], max_at_once: int = 1) -> None:
    """Within the session, at no instant did more than ``max_at_once`` runs hold it (from their
    first step's start to their end)."""
    assert runs, "no runs to check"
    spans = sorted((r.started_at, r.finished_at) for r in runs)
    assert all(start and end for start, end in spans), "every run must have run and finished"
    for i, (start, _) in enumerate(spans):
        overlapping = sum(1 for s, e in spans[: i + 1] if s <= start < e)  # type: ignore[operator]
        assert overlapping <= max_at_once, f"{overlapping} runs of one session ran at once"


def started_order(runs: list[Run]) -> list[str]:
    return [r.id for r in sorted(runs, key=lambda r: r.started_at)]  # type: ignore[arg-type,return-value]


def run_admitted(admitted: list[Admission]) -> None:
    for admission in admitted:
        step_execute(step_id=admission.step_id, token=admission.token)


def refreshed(runs: list[Run]) -> list[Run]:
    by_id = Run.objects.in_bulk([r.id for r in runs])
    return [by_id[r.id] for r in runs]


@pytest.mark.django_db(transaction=True)
def test_a_session_runs_one_whole_run_at_a_time_in_start_order_beside_other_sessions(acme: Tenant) -> None:
    chat_a = [turn(acme, "chat-a", message=f"a{n}") for n in range(4)]
    chat_b = [turn(acme, "chat-b", message=f"b{n}") for n in range(3)]
    loner = run_start(tenant=acme, workflow="test.chat_turn", input={}, actor="t").run
    assert [session_place(r) for r in refreshed(chat_a)] == [1, 2, 3, 4]
    assert not Step.objects.filter(run__in=chat_a + chat_b, status=StepStatus.READY).exists(), (
        "a waiting run holds nothing: no step of it is ready before its turn"
    )

    admitted = dispatch_round()
    admitted_runs = set(
        Step.objects.filter(pk__in=[a.step_id for a in admitted]).values_list("run", flat=True)
    )
    assert admitted_runs == {chat_a[0].id, chat_b[0].id, loner.id}, "one run per session, and the loner"
    assert [r.session_state for r in refreshed(chat_a)] == ["active", "waiting", "waiting", "waiting"]
    assert Lease.objects.filter(metadata__run_id__in=[r.id for r in chat_a[1:]]).count() == 0

    run_admitted(admitted)
    pump(rounds=40)
    chat_a, chat_b = refreshed(chat_a), refreshed(chat_b)
    assert {r.status for r in chat_a + chat_b} == {"succeeded"}
    assert {r.session_state for r in chat_a + chat_b} == {"done"}
    for runs in (chat_a, chat_b):
        assert_whole_runs_never_overlap(runs)
        assert started_order(runs) == [r.id for r in runs], "a session runs in start order"


@pytest.mark.django_db(transaction=True)
def test_out_of_order_sequence_numbers_are_put_back_in_order(acme: Tenant) -> None:
    arrivals = [3, 1, 4, 2]
    runs = {seq: turn(acme, "thread-7", sequence=seq, message=f"m{seq}") for seq in arrivals}
    assert session_place(Run.objects.get(pk=runs[1].id)) == 1
    assert session_place(Run.objects.get(pk=runs[4].id)) == 4
    pump(rounds=40)
    done = refreshed([runs[seq] for seq in (1, 2, 3, 4)])
    assert {r.status for r in done} == {"succeeded"}
    assert started_order(done) == [r.id for r in done], "run n waits for n-1"
    assert_whole_runs_never_overlap(done)


@pytest.mark.django_db(transaction=True)
def test_a_sequence_gap_waits_then_the_run_goes_on_with_the_gap_recorded(acme: Tenant) -> None:
    first = turn(acme, "gappy", workflow="test.chat_impatient", sequence=1)
    third = turn(acme, "gappy", workflow="test.chat_impatient", sequence=3)
    pump(rounds=10)
    assert Run.objects.get(pk=first.id).status == "succeeded"
    assert Run.objects.get(pk=third.id).session_state == "waiting", "3 waits for the missing 2"
    # The gap timeout (1 s for this workflow) passes: 3 goes on, and the skip is recorded.
    Run.objects.filter(pk=first.id).update(finished_at=timezone.now() - timedelta(seconds=2))
    Run.objects.filter(pk=third.id).update(created_at=timezone.now() - timedelta(seconds=2))
    pump(rounds=10)
    assert Run.objects.get(pk=third.id).status == "succeeded"
    assert Event.objects.filter(subject=f"run:{third.id}", verb="session_sequence_gap_skipped").exists()


@pytest.mark.django_db(transaction=True)
def test_a_run_waiting_for_approval_keeps_its_session(acme: Tenant, acme_operator: User) -> None:
    first = turn(acme, "ticket-1", workflow="test.chat_gated", message="one")
    second = turn(acme, "ticket-1", workflow="test.chat_gated", message="two")
    pump()
    assert Run.objects.get(pk=first.id).status == "waiting_approval"
    second.refresh_from_db()
    assert second.session_state == "waiting" and session_place(second) == 1
    assert not Step.objects.filter(run=second).exclude(status=StepStatus.PENDING).exists()

    request = pending_request(first)
    approval_decide(request=request, user=acme_operator, decision="approve", expected_version=request.version)
    pump()
    assert Run.objects.get(pk=first.id).status == "succeeded"
    assert Run.objects.get(pk=second.id).status == "waiting_approval", "the next run had its turn"


@pytest.mark.django_db(transaction=True)
def test_max_concurrent_two_runs_two_at_a_time(acme: Tenant) -> None:
    runs = [turn(acme, "pair", workflow="test.chat_pair", message=str(n)) for n in range(5)]
    admitted = dispatch_round()
    assert len(admitted) == 2
    run_admitted(admitted)
    pump(rounds=40)
    runs = refreshed(runs)
    assert {r.status for r in runs} == {"succeeded"}
    assert_whole_runs_never_overlap(runs, max_at_once=2)


@pytest.mark.django_db(transaction=True)
def test_a_run_that_waited_past_its_queue_timeout_expires_with_its_reason(acme: Tenant) -> None:
    holder = turn(acme, "slow-chat", workflow="test.chat_impatient")
    late = turn(acme, "slow-chat", workflow="test.chat_impatient")
    assert late.queue_deadline is not None
    admitted = dispatch_round()  # the holder takes its turn but does not run yet: the other waits
    Run.objects.filter(pk=late.id).update(queue_deadline=timezone.now() - timedelta(milliseconds=1))
    dispatch_round()
    late.refresh_from_db()
    assert late.status == RunStatus.EXPIRED and late.session_state == SessionState.DROPPED
    assert set(Step.objects.filter(run=late).values_list("status", flat=True)) == {"cancelled"}
    event = Event.objects.get(subject=f"run:{late.id}", verb="run_expired")
    assert "queue timeout" in event.payload["reason"]
    run_admitted(admitted)
    pump()
    assert Run.objects.get(pk=holder.id).status == "succeeded", "the session still does its job"


@pytest.mark.django_db(transaction=True)
def test_reject_overflow_answers_429_with_retry_after_and_stores_nothing(
    acme: Tenant, acme_operator: User
) -> None:
    client = bearer_client(acme_operator)
    body = {"workflow": "test.chat_strict", "input": {}, "session_key": "busy-line"}
    first = client.post("/api/v1/runs", body, content_type="application/json")
    assert first.status_code == 201, first.content
    assert first.json()["session"] == {"key": "busy-line", "sequence": None, "state": "waiting", "place": 1}
    listed = client.get("/api/v1/runs", {"session_key": "busy-line"}).json()["items"]
    assert [r["id"] for r in listed] == [first.json()["id"]]
    before = Run.objects.count()
    refused = client.post("/api/v1/runs", body, content_type="application/json")
    assert refused.status_code == 429
    assert refused["Retry-After"] == "5"
    assert refused.json()["error"]["code"] == "session_busy"
    assert Run.objects.count() == before
    pump()
    again = client.post("/api/v1/runs", body, content_type="application/json")
    assert again.status_code == 201, "a session that finished its run takes the next one"
    pump()
    assert Run.objects.get(pk=again.json()["id"]).status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_cancel_oldest_waiting_keeps_only_the_newest_waiting_run(acme: Tenant) -> None:
    running = turn(acme, "latest", workflow="test.chat_latest", message="0")
    admitted = dispatch_round()
    older = turn(acme, "latest", workflow="test.chat_latest", message="1")
    newer = turn(acme, "latest", workflow="test.chat_latest", message="2")
    older.refresh_from_db()
    assert older.status == "cancelled" and older.session_state == "dropped"
    assert (
        Event.objects.filter(subject=f"run:{older.id}", verb="cancelled")
        .get()
        .payload["reason"]
        .startswith("replaced by a newer run")
    )
    run_admitted(admitted)
    pump()
    assert Run.objects.get(pk=running.id).status == "succeeded"
    assert Run.objects.get(pk=newer.id).status == "succeeded"


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_racing_starts_into_a_reject_session_admit_exactly_one(acme: Tenant) -> None:
    for trial in range(6):
        session = f"race-{trial}"

        def start(_: int, session: str = session) -> str:
            try:
                turn(acme, session, workflow="test.chat_strict")
                return "created"
            except SessionOverflow:
                return "refused"
            finally:
                connections.close_all()

        outcomes = run_concurrently(start, 8)
        assert sorted(outcomes).count("created") == 1, outcomes
        assert Run.objects.filter(session_key=session).count() == 1


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_cancels_racing_promotions_never_leave_a_cancelled_run_with_work(acme: Tenant) -> None:
    for trial in range(5):
        runs = [turn(acme, f"cancel-race-{trial}", message=str(n)) for n in range(6)]
        stop = threading.Event()

        def rounds(stop: threading.Event = stop) -> None:
            try:
                while not stop.is_set():
                    dispatch_round()
            finally:
                connections.close_all()

        dispatcher = threading.Thread(target=rounds)
        dispatcher.start()
        try:
            run_concurrently(lambda i, runs=runs: run_cancel(run=runs[i], actor="t"), 6)
        finally:
            stop.set()
            dispatcher.join()
        for run in refreshed(runs):
            assert run.status == "cancelled"
            assert run.session_state in ("done", "dropped")
            live = Step.objects.filter(run=run).exclude(status="cancelled")
            assert not live.exists(), f"a cancelled run kept {list(live.values_list('status', flat=True))}"
    # The system still does its job, and holds every invariant.
    after = turn(acme, "cancel-race-0")
    pump()
    assert Run.objects.get(pk=after.id).status == "succeeded"
    assert check_invariants() == []


def test_session_fields_are_checked_at_the_door(acme_operator: User) -> None:
    client: Client = bearer_client(acme_operator)
    cases = [
        ({"session_key": "x" * 201}, "session_key"),
        ({"session_key": "a", "sequence": 0}, "sequence"),
        ({"session_key": "a", "sequence": "two"}, "sequence"),
        ({"sequence": 3}, "sequence"),
        ({"session_key": "bad\u0000key"}, "session_key"),
    ]
    for extra, field in cases:
        response = client.post(
            "/api/v1/runs",
            {"workflow": "test.chat_turn", "input": {}, **extra},
            content_type="application/json",
        )
        assert response.status_code in (400, 422), (extra, response.content)
        assert field in str(response.json()["error"]), (extra, response.json())
    assert not Run.objects.exists()


@REAL_WORKERS
@pytest.mark.timeout(120)
def test_two_sessions_on_real_workers_never_interleave_and_keep_their_order(
    acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("w1", queues=["read", "draft"], concurrency=4)
    cluster.dispatcher("d1")
    sessions = {
        key: [turn(acme, key, message=f"{key}-{n}", work_seconds=0.05) for n in range(8)]
        for key in ("conv-1", "conv-2")
    }
    everyone = [r for runs in sessions.values() for r in runs]
    wait_for(
        lambda: not Run.objects.filter(pk__in=[r.id for r in everyone], status__in=UNFINISHED).exists(),
        90,
        "every session run finishes",
    )
    spans = []
    for runs in sessions.values():
        runs = refreshed(runs)
        assert {r.status for r in runs} == {"succeeded"}
        assert_whole_runs_never_overlap(runs)
        assert started_order(runs) == [r.id for r in runs]
        spans.append((min(r.started_at for r in runs), max(r.finished_at for r in runs)))  # type: ignore[type-var]
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end, "the two sessions ran beside each other"
    assert check_invariants() == []
