"""Engine v2 with real processes (issue 8, "Prove it"): dispatcher failover, a backlog on one
worker process, enforced timeouts, and wake-up driven dispatch.

Every test starts real ``celery worker`` and ``manage.py dispatcher`` processes on the test
database (tests/runs/cluster.py) and asserts the engine's invariants, not just the absence of
a crash.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections
from django.db.models import Count

from approvals.models import ConflictArtifact
from core.models import Event, Tenant
from core.workers import live_pools
from demo.models import SandboxCall, SandboxContact
from runs.dispatch import dispatch_round
from runs.models import Run, SideEffect, Step, StepStatus
from runs.services import run_start
from tests.concurrency import sampled_peaks
from tests.runs.cluster import Cluster, calls_per_key, finished, wait_for

REAPED_VERBS = ("step_requeued", "step_lease_expired")


def _log(cluster: Cluster, name: str) -> str:
    path = cluster.tmp_path / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _active_dispatchers(cluster: Cluster, names: list[str]) -> list[str]:
    return [name for name in names if "is active" in _log(cluster, name)]


def _running_pid(run: Run) -> int | None:
    """The pid of the worker running the run's (single) step, once it checkpointed it."""
    step = run.steps.get()
    data = step.checkpoint or {}
    return data.get("pid") if step.status == StepStatus.RUNNING else None


def _reaped_events(run_ids: list[str]) -> int:
    return Event.objects.filter(subject__in=[f"run:{i}" for i in run_ids], verb__in=REAPED_VERBS).count()


@pytest.mark.timeout(150)
def test_killing_the_active_dispatcher_under_load_loses_nothing_and_runs_nothing_twice(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("w1")
    cluster.worker("w2")
    dispatchers = {"d1": cluster.dispatcher("d1"), "d2": cluster.dispatcher("d2")}
    wait_for(lambda: _active_dispatchers(cluster, ["d1", "d2"]), 60, cluster.logs)
    wait_for(lambda: len(live_pools()) == 2, 60, cluster.logs)
    crm = [
        run_start(
            tenant=sandbox_acme,
            workflow="demo.crm_update",
            input={"contact_id": 1 + n % 5, "changes": {"stage": f"s{n}"}},
            actor="t",
        ).run.id
        for n in range(60)
    ]
    enrich = [
        run_start(
            tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": 1 + n}, actor="t"
        ).run.id
        for n in range(20)
    ]
    ids = crm + enrich
    wait_for(lambda: Run.objects.filter(pk__in=ids, status="succeeded").count() >= 5, 60, cluster.logs)

    [active] = _active_dispatchers(cluster, ["d1", "d2"])
    [standby] = [name for name in dispatchers if name != active]
    os.kill(dispatchers[active].pid, signal.SIGKILL)
    in_flight = Run.objects.filter(pk__in=ids).exclude(status="succeeded").count()
    dispatchers[active].wait(10)

    wait_for(lambda: "is active" in _log(cluster, standby), 30, cluster.logs)
    wait_for(lambda: finished(ids), 120, cluster.logs)

    assert in_flight >= 10, "the kill must hit a batch in progress"
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}, (
        cluster.logs()
    )
    # Nothing ran twice: one provider call per run, each contact moved once per run.
    per_run = calls_per_key("update_contact")
    assert len(per_run) == len(crm)
    assert set(per_run) == {1}, "an update ran twice"
    versions = dict(
        SandboxContact.objects.filter(tenant=sandbox_acme, number__lte=5).values_list("number", "version")
    )
    assert versions == dict.fromkeys(range(1, 6), 1 + 12), "each contact moved once per run"
    # A dispatcher holds no step: losing one costs no attempt and reaps nothing.
    attempts = Step.objects.filter(run_id__in=ids).values("attempt").annotate(n=Count("id"))
    assert {row["attempt"]: row["n"] for row in attempts} == {1: len(crm) + 3 * len(enrich)}
    assert _reaped_events(ids) == 0


@pytest.mark.timeout(210)
def test_a_backlog_on_one_worker_process_runs_every_step_on_its_first_attempt(
    acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("solo")
    cluster.dispatcher()
    # Admission fills announced worker slots only once the pool has announced itself.
    wait_for(lambda: live_pools(), 60, cluster.logs)
    assert [pool.slots for pool in live_pools()] == [1]

    def admitted() -> dict[str, int]:
        return {"admitted": Step.objects.filter(status__in=[StepStatus.LEASED, StepStatus.RUNNING]).count()}

    with sampled_peaks(admitted, every=0.02) as peaks:
        ids = [
            run_start(tenant=acme, workflow="bench.noop", input={}, actor="bench").run.id for _ in range(300)
        ]
        wait_for(lambda: finished(ids), 150, cluster.logs)

    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}, (
        cluster.logs()
    )
    assert set(Step.objects.filter(run_id__in=ids).values_list("attempt", flat=True)) == {1}
    assert _reaped_events(ids) == 0, "an admission expired while its task waited"
    assert peaks.samples >= 20  # the sampler watched the whole backlog (300 runs take a second or more)
    # One slot holds RUNWARDEN_WORKER_PREFETCH admissions (the step running, by default).
    limit = settings.RUNWARDEN_WORKER_PREFETCH
    assert peaks["admitted"] <= limit, f"admission outran the one worker slot: {peaks!r}"
    assert peaks["admitted"] >= 1, "the sampler must actually see the step admitted"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("concurrency", [1, 2], ids=["solo", "prefork"])
def test_a_step_past_its_timeout_is_stopped_and_the_next_run_gets_its_entity(
    sandbox_acme: Tenant, cluster: Cluster, concurrency: int
) -> None:
    # One worker on the lane: solo runs steps in the worker process itself, prefork (the
    # Procfile's pool) in its children.
    worker = cluster.worker("w1", ["external"], concurrency=concurrency)
    cluster.dispatcher()
    hang = run_start(
        tenant=sandbox_acme,
        workflow="test.hang_on_entity",
        input={"contact_id": 3, "sleep_seconds": 30},
        actor="t",
    ).run
    wait_for(lambda: _running_pid(hang), 60, cluster.logs)
    hung_pid = _running_pid(hang)
    if concurrency == 1:
        assert hung_pid == worker.pid
    update = run_start(
        tenant=sandbox_acme,
        workflow="demo.crm_update",
        input={"contact_id": 3, "changes": {"stage": "after-timeout"}},
        actor="t",
    ).run
    # Stopped at its 1.5 s timeout, far from its 30 s sleep: not waited out.
    wait_for(lambda: finished([hang.id]), 15, cluster.logs)
    hang.refresh_from_db()
    hung = hang.steps.get()
    assert (hang.status, hung.status, hung.attempt) == ("failed", "failed", 1), cluster.logs()
    assert "timed out" in hung.error
    assert (hung.finished_at - hung.started_at).total_seconds() < 15

    wait_for(lambda: finished([update.id]), 30, cluster.logs)
    update.refresh_from_db()
    updated = update.steps.get()
    assert (update.status, updated.attempt) == ("succeeded", 1), cluster.logs()
    assert updated.started_at >= hung.finished_at, "the lock was held by the hanging step until it stopped"
    contact = SandboxContact.objects.get(tenant=sandbox_acme, number=3)
    assert (contact.stage, contact.version) == ("after-timeout", 2)
    # The process running the step was interrupted, not killed, and the worker went on.
    assert worker.poll() is None
    os.kill(hung_pid, 0)  # still alive
    # Celery logs a task's return value just after the step's transaction committed.
    wait_for(lambda: "'succeeded'" in _log(cluster, "w1"), 10, cluster.logs)
    log = _log(cluster, "w1")
    assert "'timed-out'" in log, log
    assert log.index("'timed-out'") < log.index("'succeeded'")
    assert "WorkerLostError" not in log and "exited with" not in log, log
    assert _reaped_events([hang.id, update.id]) == 0, "the timeout, not the reaper, ended the step"


@pytest.mark.timeout(120)
def test_a_timeout_with_an_effect_in_flight_becomes_a_conflict_and_never_acts_twice(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    worker = cluster.worker("w1", ["external"])
    cluster.dispatcher()
    run = run_start(
        tenant=sandbox_acme, workflow="test.hang_in_effect", input={"sleep_seconds": 30}, actor="t"
    ).run
    wait_for(lambda: finished([run.id]), 20, cluster.logs)
    wait_for(lambda: "'timed-out'" in _log(cluster, "w1"), 20, cluster.logs)
    # The same worker goes on with other work; meanwhile the reaper has had several rounds (and
    # the step's 2 s lease is long gone) to act on the step a second time, which it must not.
    after = run_start(
        tenant=sandbox_acme, workflow="test.sleepy", input={"sleep_seconds": 2.5}, actor="t"
    ).run
    wait_for(lambda: finished([after.id]), 30, cluster.logs)

    run.refresh_from_db()
    after.refresh_from_db()
    step = run.steps.get()
    assert (run.status, step.status, step.attempt) == ("conflict", "conflict", 1), cluster.logs()
    assert "timed out" in step.error
    effect = SideEffect.objects.get(run=run)
    assert effect.status == "proposed", "an interrupted effect may have happened: never 'failed'"
    conflicts = ConflictArtifact.objects.filter(step=step)
    assert list(conflicts.values_list("kind", flat=True)) == ["lease_expired_with_pending_effect"]
    assert conflicts.get().effect_id == effect.pk
    assert SandboxCall.objects.filter(connector="messaging", operation="send").count() == 1
    assert _reaped_events([run.id]) == 0
    assert after.status == "succeeded"
    assert after.steps.get().output["pid"] == worker.pid
    assert worker.poll() is None


@pytest.mark.timeout(90)
def test_each_step_is_admitted_on_a_wake_up_not_at_the_next_sweep(
    transactional_db: None, sandbox_acme: Tenant, tmp_path: Path
) -> None:
    # A 30 s sweep: a three-step run that waited for sweeps would need about 90 s.
    cluster = Cluster(tmp_path, RUNWARDEN_DISPATCH_SWEEP_SECONDS="30")
    try:
        cluster.worker("w1")
        cluster.dispatcher()
        wait_for(lambda: _active_dispatchers(cluster, ["dispatcher"]), 60, cluster.logs)
        wait_for(lambda: live_pools(), 60, cluster.logs)
        run = run_start(tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": 7}, actor="t").run
        wait_for(lambda: finished([run.id]), 15, cluster.logs)
    finally:
        cluster.stop()
    run.refresh_from_db()
    assert run.status == "succeeded"
    assert list(run.steps.order_by("position").values_list("status", "attempt")) == [("succeeded", 1)] * 3


@pytest.mark.timeout(120)
def test_a_step_hanging_in_a_database_call_past_its_timeout_is_stopped(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    """Like the sleeping step above, but the body waits in libpq (SELECT pg_sleep(20)), as a
    slow query or a row lock would. Issue 8: "A step past its timeout_seconds is stopped; its
    leases, locks and capacity are released". Fails on 52d326c: the step is failed and its
    lock released at 1.5 s, but the worker process stays busy until the query returns, while
    the dispatcher counts its slot as free and admits the next step into it."""
    worker = cluster.worker("w1", ["external"])
    cluster.dispatcher()
    hang = run_start(
        tenant=sandbox_acme,
        workflow="test.hang_in_query",
        input={"contact_id": 3, "sleep_seconds": 20},
        actor="t",
    ).run
    try:
        wait_for(lambda: _running_pid(hang), 60, cluster.logs)
        update = run_start(
            tenant=sandbox_acme,
            workflow="demo.crm_update",
            input={"contact_id": 3, "changes": {"stage": "after-timeout"}},
            actor="t",
        ).run
        wait_for(lambda: finished([hang.id]), 15, cluster.logs)
        hung = hang.steps.get()
        assert (hung.status, hung.attempt) == ("failed", 1) and "timed out" in hung.error
        # Stopped: the worker is free again well before the 20 s query would have returned...
        wait_for(
            lambda: "'timed-out'" in _log(cluster, "w1"),
            8,
            lambda: (
                "the step's process was not stopped at its timeout: it is still in its query\n"
                + cluster.logs()
            ),
        )
        # ... and runs the next run on the entity, from its first admission.
        wait_for(lambda: finished([update.id]), 8, cluster.logs)
        update.refresh_from_db()
        assert update.status == "succeeded"
        assert worker.poll() is None
        assert _log(cluster, "w1").count("'not-ours'") == 0, "the next step's task was sent twice"
    finally:
        # End the query this test left behind, so the test database can be dropped.
        with connections["default"].cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%%'"
                " AND pid <> pg_backend_pid()"
            )


@pytest.mark.timeout(90)
def test_a_worker_goes_straight_on_with_the_runs_next_steps(sandbox_acme: Tenant, cluster: Cluster) -> None:
    cluster.worker("w1")  # every lane; and no dispatcher process at all
    wait_for(lambda: live_pools(), 60, cluster.logs)
    run = run_start(tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": 7}, actor="t").run
    assert len(dispatch_round()) == 1  # this test process admits the first step, once
    # Nobody dispatches after that: the worker admits steps 2 and 3 itself as it finishes each.
    wait_for(lambda: finished([run.id]), 30, cluster.logs)
    run.refresh_from_db()
    assert run.status == "succeeded", cluster.logs()
    assert list(run.steps.order_by("position").values_list("status", "attempt")) == [("succeeded", 1)] * 3
