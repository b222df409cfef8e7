"""One worker process on Celery's threads pool runs many awaiting steps at once, its database
work on a few coordination threads: the connections it holds stay bounded whatever its slots,
and every step's effect happens once (real worker and dispatcher processes, PostgreSQL, Redis)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db import connection

from core.models import Tenant, TenantQuota
from core.workers import live_pools
from runs.invariants import check_invariants
from runs.models import EffectStatus, Run, SideEffect, Step, StepStatus
from runs.services import run_start
from tests.concurrency import sampled_peaks
from tests.runs.cluster import Cluster, finished, wait_for

SLOTS = 60
COORDINATION_THREADS = 4
RUNS = 120
APPLICATION_NAME = "rw-many-steps-worker"


def worker_connections() -> int:
    """The worker process's connections to this database (its DATABASE_URL names it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            [APPLICATION_NAME],
        )
        return int(cursor.fetchone()[0])


def threads_pool_worker(cluster: Cluster, name: str, slots: int) -> None:
    """A worker of the draft lane on the threads pool, its connections named for counting."""
    db = settings.DATABASES["default"]
    cluster.worker(
        name,
        ["draft"],
        concurrency=slots,
        pool="threads",
        DATABASE_URL=(
            f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}?application_name={APPLICATION_NAME}"
        ),
        RUNWARDEN_COORDINATION_THREADS=str(COORDINATION_THREADS),
    )


def running_and_connections(ids: list[str]) -> dict[str, int]:
    """Of these runs, how many have a step running; the worker's connections."""
    running = Run.objects.filter(pk__in=ids, steps__status=StepStatus.RUNNING).count()
    return {"running": running, "connections": worker_connections()}


@pytest.fixture
def roomy_cluster(acme: Tenant, tmp_path: Path) -> Iterator[Cluster]:
    """Worker and dispatcher processes under caps and a quota that never hold these back."""
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    caps = {"global": 1000, "tenant_default": 1000, "lane": {"draft": 1000}}
    cluster = Cluster(tmp_path, RUNWARDEN_CAPS=json.dumps(caps))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.timeout(240)
@pytest.mark.django_db(transaction=True)
def test_one_worker_process_runs_many_awaiting_steps_at_once_on_few_connections(
    acme: Tenant, roomy_cluster: Cluster
) -> None:
    cluster = roomy_cluster
    threads_pool_worker(cluster, "many", SLOTS)
    cluster.dispatcher()
    start = {"tenant": acme, "workflow": "test.awaits_a_model", "input": {"wait_seconds": 1.0}}
    ids = [run_start(**start, actor="t").run.pk for _ in range(RUNS)]
    began = time.monotonic()

    with sampled_peaks(partial(running_and_connections, ids), every=0.05) as peaks:
        wait_for(lambda: finished(ids), 180, cluster.logs)
    took = time.monotonic() - began

    print(f"{RUNS} runs of a 1 s await on {SLOTS} slots: {took:.1f} s; peaks {dict(peaks)}")
    statuses = set(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
    assert statuses == {"succeeded"}, cluster.logs()
    # Many steps awaited at once in the one process (each waits 1 s; alone, 120 would take 120 s).
    assert peaks["running"] >= SLOTS // 2, (peaks, took)
    # Its coordination threads, plus its heartbeat watcher's connection while it renews.
    assert 1 <= peaks["connections"] <= COORDINATION_THREADS + 1, peaks
    # Every effect happened once: the outside world's count, and the ledger's record.
    outside = redis.Redis.from_url(settings.REDIS_URL)
    counts = [int(outside.get(f"test:notified:{run_id}") or 0) for run_id in ids]
    assert counts == [1] * RUNS
    committed = SideEffect.objects.filter(run_id__in=ids, status=EffectStatus.COMMITTED)
    assert committed.count() == RUNS
    assert check_invariants() == []


SMALL_POOL_SLOTS = 3


@pytest.mark.timeout(120)
@pytest.mark.django_db(transaction=True)
def test_a_pool_of_fewer_slots_than_coordination_threads_does_its_own_database_work(
    acme: Tenant, roomy_cluster: Cluster
) -> None:
    """Each slot of a pool of fewer slots than coordination threads does its steps' database
    work on a connection of its own (no hand-off); an async body's calls go to the threads the
    slots leave over. Plain and async bodies side by side: every effect once, no more steps at
    once than slots, no more connections than ``RUNWARDEN_COORDINATION_THREADS``."""
    cluster = roomy_cluster
    threads_pool_worker(cluster, "small", SMALL_POOL_SLOTS)
    cluster.dispatcher()
    ids = [
        run_start(tenant=acme, workflow=flow, input={"wait_seconds": 0.1}, actor="t").run.pk
        for flow in ["test.waits_plainly", "test.awaits_a_model"] * 12
    ]

    with sampled_peaks(partial(running_and_connections, ids), every=0.02) as peaks:
        wait_for(lambda: finished(ids), 90, cluster.logs)

    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}, (
        cluster.logs()
    )
    # Each plain step found its slot's connection open: its start ran there, not handed off
    # (a slot that hands off closes its connection after every task).
    plain = Step.objects.filter(run_id__in=ids, run__workflow="test.waits_plainly")
    assert [step.output["started_on_this_thread"] for step in plain] == [True] * (len(ids) // 2)
    assert 1 <= peaks["running"] <= SMALL_POOL_SLOTS, peaks
    # The slots' own and the one thread they leave over, plus the heartbeat watcher's.
    assert 1 <= peaks["connections"] <= COORDINATION_THREADS + 1, peaks
    outside = redis.Redis.from_url(settings.REDIS_URL)
    assert [int(outside.get(f"test:notified:{run_id}") or 0) for run_id in ids] == [1] * len(ids)
    committed = SideEffect.objects.filter(run_id__in=ids, status=EffectStatus.COMMITTED)
    assert committed.count() == len(ids)
    assert check_invariants() == []


KILLED_IN_FLIGHT = 200


@pytest.mark.timeout(240)
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_with_200_steps_in_flight_loses_none_and_repeats_no_effect(
    acme: Tenant, roomy_cluster: Cluster
) -> None:
    cluster = roomy_cluster
    doomed = cluster.worker("doomed", ["draft"], concurrency=KILLED_IN_FLIGHT, pool="threads")
    cluster.dispatcher()
    start = {"tenant": acme, "workflow": "test.awaits_a_model", "input": {"wait_seconds": 3.0}}
    ids = [run_start(**start, actor="t").run.pk for _ in range(KILLED_IN_FLIGHT)]
    in_flight = Run.objects.filter(pk__in=ids, steps__status=StepStatus.RUNNING)
    wait_for(lambda: in_flight.count() >= KILLED_IN_FLIGHT * 0.9, 60, cluster.logs)
    killed_with = in_flight.count()
    os.killpg(doomed.pid, signal.SIGKILL)
    cluster.worker("heir", ["draft"], concurrency=KILLED_IN_FLIGHT, pool="threads")
    wait_for(lambda: finished(ids), 180, cluster.logs)

    runs = dict(Run.objects.filter(pk__in=ids).values_list("pk", "status"))
    outside = redis.Redis.from_url(settings.REDIS_URL)
    counts = {run_id: int(outside.get(f"test:notified:{run_id}") or 0) for run_id in ids}
    # No effect twice; a run whose effect the kill cut off mid-call waits for a reviewer (it may
    # have happened), every other run finished with its effect done once.
    assert max(counts.values()) == 1, counts
    for run_id, status in runs.items():
        if status == "conflict":
            assert SideEffect.objects.get(run_id=run_id).status == EffectStatus.PROPOSED
        else:
            assert (status, counts[run_id]) == ("succeeded", 1), cluster.logs()
    retried = Run.objects.filter(pk__in=ids, steps__attempt__gt=1).count()
    assert retried >= killed_with - 5, (retried, killed_with)  # those in flight ran again elsewhere
    assert check_invariants() == []


TOOL_CAP = 4
CAPPED_RUNS = 240


@pytest.mark.timeout(240)
@pytest.mark.django_db(transaction=True)
def test_workers_admitting_their_own_next_steps_at_once_never_pass_a_cap(
    acme: Tenant, tmp_path: Path
) -> None:
    """Two threads-pool workers of 30 slots each; half the runs call the crm tool, capped at 4.
    Workers finishing an uncapped step admit their next one themselves under one shard of the
    admission lock each, so a capped step is theirs to admit only where the cap leaves room
    for every shard; near the cap the dispatcher admits under all of it. Sampled from another
    connection, the tool never has more than its cap; every run succeeds, every effect once."""
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    caps = {"global": 1000, "tenant_default": 1000, "lane": {"draft": 1000}, "tool": {"crm": TOOL_CAP}}
    cluster = Cluster(tmp_path, RUNWARDEN_CAPS=json.dumps(caps))
    try:
        for name in ("capped1", "capped2"):
            cluster.worker(name, ["draft"], concurrency=30, pool="threads")
        # Their slots announced: admission fills those, not the caps alone.
        wait_for(lambda: sum(pool.slots for pool in live_pools()) == 60, 60, cluster.logs)
        cluster.dispatcher()
        ids = [
            run_start(tenant=acme, workflow=workflow, input={"wait_seconds": 0.05}, actor="t").run.pk
            for _ in range(CAPPED_RUNS // 2)
            for workflow in ("test.awaits_a_model", "test.awaits_a_tool")
        ]

        def measure() -> dict[str, int]:
            admitted = Step.objects.filter(run_id__in=ids, status__in=[StepStatus.LEASED, StepStatus.RUNNING])
            return {"crm": admitted.filter(tool="crm").count(), "all": admitted.count()}

        with sampled_peaks(measure, every=0.01) as peaks:
            wait_for(lambda: finished(ids), 180, cluster.logs)
    finally:
        cluster.stop()
    print(f"{CAPPED_RUNS} runs, half through a tool capped at {TOOL_CAP}: peaks {dict(peaks)}")
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}
    assert peaks["crm"] == TOOL_CAP, peaks  # reached, never passed
    assert 2 * TOOL_CAP < peaks["all"] <= 60, peaks  # the uncapped half side by side, in the slots
    outside = redis.Redis.from_url(settings.REDIS_URL)
    assert [int(outside.get(f"test:notified:{run_id}") or 0) for run_id in ids] == [1] * CAPPED_RUNS
    assert check_invariants() == []
