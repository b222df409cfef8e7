"""A tenant's queue depth (runs/queue_depth.py): starts of one tenant take places on counter rows
kept by a trigger, never more than ``max_queue_depth`` unfinished runs, without queueing on one
row; the counters follow every status move (checked by check_invariants)."""

from __future__ import annotations

import random
import re
import threading

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from core import services as core_services
from core.models import Event, Tenant, TenantQuota
from runs.invariants import check_invariants
from runs.models import QueueDepth, Run, RunStatus, Step
from runs.queue_depth import SHARDS, QuotaExceeded, queue_depth_miscounts, queue_place_take
from runs.services import UNFINISHED_RUN_STATUSES, run_cancel, run_retry, run_start
from tests.approvals.helpers import pump
from tests.concurrency import run_concurrently

pytestmark = pytest.mark.django_db(transaction=True)

RACING_STARTERS = 8


def start(tenant: Tenant, n: int) -> Run:
    return run_start(tenant=tenant, workflow="bench.noop", input={}, actor=f"t{n}").run


def unfinished(tenant: Tenant) -> int:
    return Run.objects.filter(tenant=tenant, status__in=UNFINISHED_RUN_STATUSES).count()


def counted(tenant: Tenant) -> int:
    return sum(QueueDepth.objects.filter(tenant=tenant).values_list("unfinished", flat=True))


@pytest.fixture
def on_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the counters are PostgreSQL's (SQLite counts the runs: one writer at a time)")


def test_the_trigger_counts_exactly_the_unfinished_statuses(on_postgresql: None) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT prosrc FROM pg_proc WHERE proname = 'runs_queue_depth_track'")
        source = cursor.fetchone()[0]
    named = "('" + "', '".join(UNFINISHED_RUN_STATUSES) + "')"
    lists = re.findall(r"IN (\([^)]*\))", source)
    assert lists and set(lists) == {named}, source


def test_the_counters_follow_every_status_move(acme: Tenant, on_postgresql: None) -> None:
    runs = [start(acme, n) for n in range(6)]
    assert counted(acme) == unfinished(acme) == 6
    run_cancel(run=runs[0], actor="t")  # a service's move
    Run.objects.filter(pk=runs[1].pk).update(status=RunStatus.FAILED)  # any UPDATE
    Run.objects.filter(pk=runs[2].pk).update(status=RunStatus.WAITING_APPROVAL)  # unfinished to unfinished
    runs[3].delete()
    assert counted(acme) == unfinished(acme) == 3
    run_retry(run=Run.objects.get(pk=runs[1].pk), actor="t")  # a finished run back in the queue
    assert counted(acme) == unfinished(acme) == 4
    Run.objects.bulk_create(Run(tenant=acme, workflow="bench.noop", actor="t") for _ in range(3000))
    assert counted(acme) == unfinished(acme) == 3004
    Run.objects.filter(tenant=acme, actor="t").update(status=RunStatus.CANCELLED)  # one statement
    assert counted(acme) == unfinished(acme) == 4
    for _ in range(10):
        pump()
    assert unfinished(acme) == 1  # the waiting_approval one, set by hand
    assert queue_depth_miscounts() == []
    assert "queue_depth_counted" not in {finding.check for finding in check_invariants()}


def test_two_starts_of_one_tenant_hold_places_at_once(acme: Tenant, on_postgresql: None) -> None:
    """The first start stays open holding its place; the second takes another without waiting
    (a lock wait would fail it under lock_timeout)."""
    start(acme, 0)  # the tenant's counter rows exist
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        try:
            with transaction.atomic():
                queue_place_take(acme)
                held.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert held.wait(10)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '1s'")
            shard = queue_place_take(acme)
        assert 0 <= shard < SHARDS
        assert start(acme, 1).depth_shard in range(SHARDS)
    finally:
        release.set()
        thread.join(10)


@pytest.mark.parametrize("limit", [5, 60])  # the slow path alone; the fast path, then the slow
def test_racing_starts_and_finishes_never_pass_the_queue_depth(acme: Tenant, limit: int) -> None:
    """8 threads start runs of one tenant at once while a 9th finishes some (a different action
    on the same counters): the unfinished runs never pass the limit, every start refused only
    at the limit, and the counters agree with the runs after every trial."""
    TenantQuota.objects.filter(tenant=acme).update(max_queue_depth=limit)
    for trial in range(5):
        Run.objects.filter(tenant=acme).update(status=RunStatus.SUCCEEDED)
        peak, outcomes = _starts_racing_a_finisher(acme, attempts_each=limit // 4 + 4)
        refused = [o for o in outcomes if isinstance(o, QuotaExceeded)]
        assert peak <= limit, (trial, peak)
        assert unfinished(acme) <= limit
        assert all(exc.depth >= exc.limit == limit for exc in refused)
        assert len(outcomes) - len(refused) >= limit, "a start was refused below the limit"
        assert queue_depth_miscounts() == [], trial


def _starts_racing_a_finisher(tenant: Tenant, attempts_each: int) -> tuple[int, list[object]]:
    """RACING_STARTERS threads each try ``attempts_each`` starts while another thread cancels
    pending runs; the most unfinished runs any of them saw, and every start's outcome."""
    peak = {"unfinished": 0}
    stop = threading.Event()

    def finisher() -> None:
        try:
            while not stop.is_set():
                victim = Run.objects.filter(tenant=tenant, status=RunStatus.PENDING).order_by("?").first()
                if victim is not None:
                    Run.objects.filter(pk=victim.pk).update(status=RunStatus.CANCELLED)
                peak["unfinished"] = max(peak["unfinished"], unfinished(tenant))
        finally:
            connections.close_all()

    def starter(i: int) -> list[object]:
        outcomes: list[object] = []
        for n in range(attempts_each):
            try:
                outcomes.append(start(tenant, 1000 * i + n))
            except QuotaExceeded as refused:
                outcomes.append(refused)
            if random.random() < 0.3:
                peak["unfinished"] = max(peak["unfinished"], unfinished(tenant))
        return outcomes

    watcher = threading.Thread(target=finisher, daemon=True)
    watcher.start()
    try:
        results = run_concurrently(starter, RACING_STARTERS)
    finally:
        stop.set()
        watcher.join(10)
    unexpected = [r for r in results if isinstance(r, BaseException)]
    assert not unexpected, unexpected
    return peak["unfinished"], [o for per_thread in results for o in per_thread]


def test_starts_without_a_finisher_fill_the_queue_exactly(acme: Tenant) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_queue_depth=30)
    for _ in range(3):
        Run.objects.filter(tenant=acme).update(status=RunStatus.SUCCEEDED)
        results = run_concurrently(lambda i: [_try(acme, 100 * i + n) for n in range(6)], RACING_STARTERS)
        started = sum(1 for per_thread in results for ok in per_thread if ok)
        assert started == 30 == unfinished(acme)
    assert queue_depth_miscounts() == []
    start_after = Run.objects.filter(tenant=acme).update(status=RunStatus.SUCCEEDED)
    assert start_after == 90
    assert start(acme, 0).status == RunStatus.PENDING  # room again: a normal start goes through


def _try(tenant: Tenant, n: int) -> bool:
    try:
        start(tenant, n)
    except QuotaExceeded:
        return False
    return True


def test_a_start_outside_any_transaction_is_written_whole_in_one_round_trip(
    acme: Tenant, on_postgresql: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed: list[Event] = []
    monkeypatch.setattr(
        core_services, "_event_listeners", [*core_services._event_listeners, committed.append]
    )
    start(acme, 0)  # a tenant's first start creates its counter rows, the slow way
    with CaptureQueriesContext(connection) as queries:
        run = start(acme, 1)
    assert len(queries) == 1, [q["sql"][:80] for q in queries]
    sent = queries[0]["sql"]
    assert all(f"INSERT INTO {table}" in sent for table in ("runs_run", "runs_step", "core_event")), sent
    stored = Run.objects.get(pk=run.pk)
    assert stored.depth_shard == run.depth_shard and stored.steps.count() == 1
    created = Event.objects.get(subject=f"run:{run.pk}", verb="created")
    assert [event.pk for event in committed if event.subject == f"run:{run.pk}"] == [created.pk]
    assert created.payload["contract"]["correlation_id"] == run.correlation_id
    assert queue_depth_miscounts() == []


def test_a_start_the_fast_path_refuses_leaves_nothing_of_its_attempt_and_the_exact_count_decides(
    acme: Tenant, on_postgresql: None
) -> None:
    # Below SHARDS places the fast path never applies: every start goes the slow way.
    TenantQuota.objects.update_or_create(tenant=acme, defaults={"max_queue_depth": 3})
    runs = [start(acme, n) for n in range(3)]
    with pytest.raises(QuotaExceeded):
        start(acme, 3)
    assert unfinished(acme) == counted(acme) == 3
    assert Event.objects.filter(tenant=acme, verb="created").count() == 3
    assert Step.objects.filter(tenant=acme).count() == 3
    assert {r.pk for r in Run.objects.filter(tenant=acme)} == {r.pk for r in runs}
    assert queue_depth_miscounts() == []
    pump()  # the system still does its job
    assert set(Run.objects.filter(tenant=acme).values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
