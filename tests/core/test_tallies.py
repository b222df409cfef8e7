"""Tallies: the overview's per-tenant coordination counts, added up exactly by concurrent
writers on the real PostgreSQL, counted only when the writer's transaction commits."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from core import coordination, tallies
from core.leases import locks_acquire, locks_release
from core.models import Tally, Tenant
from runs.dispatch import admit_round
from runs.models import RunStatus, Step, StepStatus
from runs.services import run_start
from tests.concurrency import run_concurrently, tally_rows_held_meanwhile
from tests.runs.cluster import wait_for


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_add_up_exactly_and_never_deadlock(acme: Tenant, globex: Tenant) -> None:
    threads, rounds = 8, 40
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def writer(n: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                # Batches that name the same rows in opposite orders: sorted inside, no deadlock.
                names = [tallies.LOCK_CONFLICTS, tallies.DUPLICATES_SUPPRESSED]
                if n % 2:
                    names.reverse()
                with transaction.atomic():
                    tallies.tally_add([(acme.pk, name) for name in names] + [(globex.pk, names[0])])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    since = timezone.now() - timedelta(hours=1)
    acme_totals = tallies.tallies_since([acme.pk], since)
    assert acme_totals[tallies.LOCK_CONFLICTS] == threads * rounds
    assert acme_totals[tallies.DUPLICATES_SUPPRESSED] == threads * rounds
    globex_totals = tallies.tallies_since([globex.pk], since)
    assert sum(globex_totals.values()) == threads * rounds  # and none of it shows as acme's


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_attempt_counts_nothing(acme: Tenant) -> None:
    with transaction.atomic():
        tallies.tally_add([(acme.pk, tallies.LOCK_CONFLICTS)])
    with pytest.raises(RuntimeError), transaction.atomic():
        tallies.tally_add([(acme.pk, tallies.LOCK_CONFLICTS)])
        raise RuntimeError("the admission failed")
    assert Tally.objects.get(tenant=acme, name=tallies.LOCK_CONFLICTS).count == 1


@pytest.mark.django_db(transaction=True)
def test_a_round_tallies_a_lock_conflict_for_the_tenant_whose_step_gave_way(
    acme: Tenant, globex: Tenant
) -> None:
    held = locks_acquire(tenant_id=acme.pk, keys=["thing:1"], holder="another run", ttl=30)
    run = run_start(tenant=acme, workflow="test.gives_way", input={"thing_id": 1}, actor="t").run
    admit_round()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED  # it gave way (lock policy "skip")
    since = timezone.now() - timedelta(hours=1)
    assert tallies.tallies_since([acme.pk], since)[tallies.LOCK_CONFLICTS] == 1
    assert tallies.tallies_since([globex.pk], since)[tallies.LOCK_CONFLICTS] == 0
    locks_release(held)


@pytest.mark.django_db(transaction=True)
def test_each_admission_refused_by_a_live_step_lease_is_tallied(acme: Tenant) -> None:
    run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    [admission] = admit_round().admitted
    # Ready again while the lease of its admission still lives (a retry readied too early):
    # no round may admit it twice, and each refusal is counted.
    Step.objects.filter(pk=admission.step_id).update(status=StepStatus.READY)
    assert admit_round().admitted == []
    assert admit_round().admitted == []
    since = timezone.now() - timedelta(hours=1)
    assert tallies.tallies_since([acme.pk], since)[tallies.RETRIES_BLOCKED_BY_LEASE] == 2
    assert Step.objects.get(pk=admission.step_id).lease_token == admission.token


def test_lock_waits_are_bucketed_and_summarised() -> None:
    assert tallies.lock_wait_bucket(0.05) == "lock_wait_le_0.1"
    assert tallies.lock_wait_bucket(0.1) == "lock_wait_le_0.1"
    assert tallies.lock_wait_bucket(3) == "lock_wait_le_5"
    assert tallies.lock_wait_bucket(10_000) == "lock_wait_le_inf"
    totals = Counter({"lock_wait_le_0.1": 10, "lock_wait_le_300": 1})
    assert tallies.lock_wait_summary(totals) == {"n": 11, "p50": "≤ 0.1 s", "p95": "≤ 300 s"}
    assert tallies.lock_wait_summary(Counter()) == {"n": 0, "p50": "—", "p95": "—"}
    assert tallies.lock_wait_summary(Counter({"lock_wait_le_inf": 2}))["p95"] == "> 3600 s"


@pytest.mark.django_db
def test_old_tallies_are_pruned_and_the_last_hour_is_read(acme: Tenant) -> None:
    now = timezone.now()
    tallies.tally_add([(acme.pk, tallies.LOCK_CONFLICTS)], now=now - timedelta(days=3))
    tallies.tally_add([(acme.pk, tallies.LOCK_CONFLICTS)], now=now - timedelta(minutes=90))
    tallies.tally_add([(acme.pk, tallies.LOCK_CONFLICTS)], now=now)
    assert tallies.tallies_since([acme.pk], now - timedelta(hours=1))[tallies.LOCK_CONFLICTS] == 1
    assert tallies.tallies_prune(now=now) == 1
    assert Tally.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_tallies_committed_on_coordination_threads_are_written_together_and_add_up(acme: Tenant) -> None:
    """With coordination threads, a process writes its committed tallies together, off the
    committing call's path; those committed while a write is held up are written once it is
    done. They add up exactly: every committed transaction's count, none of a rolled-back one's."""
    committed, rolled_back = 30, 5

    def admitting(n: int) -> None:
        with transaction.atomic():
            tallies.tally_add_on_commit(Counter({(acme.pk, tallies.LOCK_CONFLICTS): 1}))
            if n >= committed:
                transaction.set_rollback(True)

    def a_write_waits_for_the_row() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO core_tally%%')"
            )
            return bool(cursor.fetchone()[0])

    coordination.coordinate_on_threads(2)
    try:
        with tally_rows_held_meanwhile(acme.pk, [tallies.LOCK_CONFLICTS]):
            coordination.run(admitting, 0)  # returns at once: its write, a moment later, waits for the row
            wait_for(
                a_write_waits_for_the_row, 10, "the first write never reached the held row", interval=0.01
            )
            results = run_concurrently(
                lambda n: coordination.run(admitting, n + 1), committed + rolled_back - 1
            )
            assert not [r for r in results if isinstance(r, BaseException)], results
        assert tallies.tallies_written(10)
    finally:
        coordination.coordinate_in_place()
    since = timezone.now() - timedelta(hours=1)
    assert tallies.tallies_since([acme.pk], since)[tallies.LOCK_CONFLICTS] == committed


@pytest.mark.django_db(transaction=True)
def test_a_process_with_coordination_threads_writes_its_tallies_together_a_moment_later(
    acme: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admissions committed one after the other (a key handed on every few milliseconds) are not
    written one by one as they commit: nothing is written for ``WRITE_EVERY_SECONDS``, then all
    of them at once."""
    monkeypatch.setattr(tallies, "WRITE_EVERY_SECONDS", 1.5)
    since = timezone.now() - timedelta(hours=1)

    def admitting() -> None:
        with transaction.atomic():
            tallies.tally_add_on_commit(Counter({(acme.pk, tallies.LOCK_CONFLICTS): 1}))

    def written() -> int:
        return tallies.tallies_since([acme.pk], since)[tallies.LOCK_CONFLICTS]

    coordination.coordinate_on_threads(2)
    try:
        began = time.monotonic()
        for _ in range(20):
            coordination.run(admitting)
            time.sleep(0.005)
        time.sleep(0.3)  # long enough for a write right after each commit to show
        seen_early, early = written(), time.monotonic() - began
        assert tallies.tallies_written(10)
    finally:
        coordination.coordinate_in_place()
    if early < 1.2:  # the checks ran well inside the gathering time (a stalled machine: not)
        assert seen_early == 0
    assert written() == 20


@pytest.mark.django_db(transaction=True)
def test_tallies_gathered_when_the_coordination_threads_stop_are_written_before_they_stop(
    acme: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping the threads does not wait out the gathering, nor leave a write to the timer's
    thread (nor drop a count): what was gathered is written on the threads before they close."""
    monkeypatch.setattr(tallies, "WRITE_EVERY_SECONDS", 30.0)
    coordination.coordinate_on_threads(2)
    try:
        with transaction.atomic():
            tallies.tally_add_on_commit(Counter({(acme.pk, tallies.LOCK_CONFLICTS): 1}))
    finally:
        coordination.coordinate_in_place()
    assert tallies.tallies_written(1)  # the timer never fires
    since = timezone.now() - timedelta(hours=1)
    assert tallies.tallies_since([acme.pk], since)[tallies.LOCK_CONFLICTS] == 1
