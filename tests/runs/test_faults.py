"""Faults on the real processes (issue 11): real worker, dispatcher and beat processes, the real
PostgreSQL and a private Redis on loopback. Each fault is bounded and stops by itself; after
each: no run lost, no effect doubled, the ambiguous case a conflict, ``check_invariants`` clean.

Covered elsewhere, on the same real processes: a worker SIGKILLed mid-step and mid-heartbeat
(test_execution), before and during an effect (test_conflicts: the ambiguous cases), SIGSTOPped
past its lease then resumed (test_execution), the active dispatcher killed (test_engine_processes),
a step past its timeout (test_engine_processes), Redis restarted at once (test_execution).
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from approvals.models import ApprovalRequest
from core.models import Event, Tenant
from demo.models import SandboxCall
from runs.invariants import check_invariants
from runs.models import EffectStatus, Run, RunStatus, SideEffect
from runs.services import run_start
from tests.runs.cluster import Cluster, calls_per_key, crm_runs, finished, private_redis, wait_for
from tests.servers import base_env, console_server, database_url

REDIS_DOWN_SECONDS = float(os.environ.get("RUNWARDEN_FAULT_REDIS_DOWN_SECONDS", "30"))


def assert_invariants_hold() -> None:
    findings = check_invariants()
    assert not findings, "\n".join(str(f) for f in findings)


@pytest.mark.timeout(180)
def test_a_worker_killed_after_its_effect_committed_finishes_on_retry_without_a_second_send(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("w1", ["external"])
    cluster.worker("w2", ["external"])
    cluster.worker("maint", ["maintenance"])
    cluster.beat()
    run = run_start(
        tenant=sandbox_acme, workflow="test.crash_on_send", input={"die_after_commit": True}, actor="t"
    ).run
    wait_for(lambda: finished([run.id]), 90, cluster.logs)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, cluster.logs()
    step = run.steps.get()
    assert step.attempt == 2, "the first worker really died"
    assert SandboxCall.objects.filter(connector="messaging", operation="send").count() == 1
    assert SideEffect.objects.get(run=run).status == EffectStatus.COMMITTED
    assert_invariants_hold()


def _readyz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as down:
        return down.code, down.read().decode()


@pytest.mark.timeout(300)
def test_redis_down_mid_batch_is_reported_by_readyz_and_every_run_finishes_once_after(
    sandbox_acme: Tenant, transactional_db: None, tmp_path: Path
) -> None:
    with private_redis() as (redis_url, set_running):
        cluster = Cluster(tmp_path, redis_url=redis_url, RUNWARDEN_SANDBOX_LATENCY_MS="150")
        web_env = base_env(
            DEBUG="1",
            DATABASE_URL=database_url(),
            REDIS_URL=redis_url,
        )
        try:
            with console_server(web_env, tmp_path / "serve.log") as web:
                cluster.worker("w1")
                cluster.worker("w2")
                cluster.beat()
                ids = crm_runs(sandbox_acme, 30)
                wait_for(
                    lambda: Run.objects.filter(pk__in=ids, status="succeeded").count() >= 5,
                    60,
                    cluster.logs,
                )
                set_running(False)
                in_flight = Run.objects.filter(pk__in=ids).exclude(status="succeeded").count()
                down_at = time.monotonic()
                status, body = _readyz(web)
                assert status == 503 and "redis" in body, body
                # Nothing is lost while it is down: runs wait, no step runs twice.
                time.sleep(max(0.0, REDIS_DOWN_SECONDS - (time.monotonic() - down_at)))
                assert _readyz(web)[0] == 503
                set_running(True)
                wait_for(lambda: _readyz(web)[0] == 200, 30, "readyz recovers")
                wait_for(lambda: finished(ids), 200, cluster.logs)
        finally:
            cluster.stop()
    assert in_flight >= 10, "the outage must hit a batch in progress"
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}, (
        cluster.logs()
    )
    per_run = calls_per_key("update_contact")
    assert len(per_run) == 30 and set(per_run) == {1}, "an update ran twice or never"
    assert_invariants_hold()


def _drop_every_connection_to_the_test_database(seconds: float) -> int:
    """What a PostgreSQL restart does to its clients: every session is cut, and for a while
    new ones are cut as soon as they appear. Returns how many sessions were terminated."""
    name = settings.DATABASES["default"]["NAME"]
    terminated = 0
    deadline = time.monotonic() + seconds
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            terminated += cursor.fetchone()[0]
            time.sleep(0.05)
    return terminated


@pytest.mark.timeout(300)
def test_every_database_connection_cut_mid_batch_loses_nothing_and_runs_nothing_twice(
    sandbox_acme: Tenant, transactional_db: None, tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path, RUNWARDEN_SANDBOX_LATENCY_MS="150")
    try:
        cluster.worker("w1")
        cluster.worker("w2")
        cluster.beat()
        ids = crm_runs(sandbox_acme, 30)
        wait_for(lambda: Run.objects.filter(pk__in=ids, status="succeeded").count() >= 5, 60, cluster.logs)
        in_flight = Run.objects.filter(pk__in=ids).exclude(status="succeeded").count()
        terminated = _drop_every_connection_to_the_test_database(3.0)
        wait_for(lambda: finished(ids), 200, cluster.logs)
        # The processes reconnected by themselves: none was restarted.
        assert all(p.poll() is None for p in cluster.processes.values()), cluster.logs()
    finally:
        cluster.stop()
    assert in_flight >= 10 and terminated >= 3, (in_flight, terminated)
    statuses = set(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
    # A connection cut between an update's call and its record is ambiguous: a conflict, not a retry.
    assert statuses <= {RunStatus.SUCCEEDED, RunStatus.CONFLICT}, statuses
    per_run = calls_per_key("update_contact")
    assert per_run, "no update reached the provider"
    assert all(n == 1 for n in per_run), "an update ran twice"
    conflicts = Run.objects.filter(pk__in=ids, status=RunStatus.CONFLICT).count()
    assert len(per_run) + conflicts >= 30
    assert_invariants_hold()


@pytest.mark.timeout(180)
def test_beat_killed_and_started_again_expires_a_due_approval_exactly_once(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("w1")
    cluster.beat()
    run = run_start(tenant=sandbox_acme, workflow="test.quick_timeout_gate", input={}, actor="t").run
    wait_for(lambda: ApprovalRequest.objects.filter(run=run).exists(), 60, cluster.logs)
    beat = cluster.processes["beat"]
    beat.kill()
    beat.wait(10)
    time.sleep(8)  # past the 2 s timeout and more than one 5 s schedule: nothing expires it
    assert ApprovalRequest.objects.get(run=run).status == "pending"
    # Other work goes on without beat: it is not on the hot path.
    other = crm_runs(sandbox_acme, 3)
    wait_for(lambda: finished(other), 60, cluster.logs)
    cluster.beat("beat2", with_dispatcher=False)
    wait_for(lambda: ApprovalRequest.objects.get(run=run).status == "expired", 60, cluster.logs)
    wait_for(lambda: finished([run.id]), 60, cluster.logs)
    assert Event.objects.filter(verb="approval_expired", subject=f"run:{run.id}").count() == 1
    assert_invariants_hold()


@pytest.mark.timeout(120)
def test_many_racing_clients_decide_one_approval_once(sandbox_acme: Tenant, cluster: Cluster) -> None:
    """Soak's racing approvals in miniature: eight threads approve the same request at once."""
    from approvals import services as approvals_services
    from tests.conftest import make_member

    deciders = [make_member(f"racer{i}", sandbox_acme, "operator") for i in range(8)]
    cluster.worker("w1")
    cluster.beat()
    run = run_start(
        tenant=sandbox_acme, workflow="demo.lead_followup", input={"lead_id": 3, "contact_id": 3}, actor="t"
    ).run
    wait_for(lambda: ApprovalRequest.objects.filter(run=run, status="pending").exists(), 60, cluster.logs)
    request = ApprovalRequest.objects.get(run=run, status="pending")
    outcomes: list[str] = []
    barrier = threading.Barrier(len(deciders))

    def decide(i: int) -> None:
        from django.db import connections

        try:
            barrier.wait(10)
            approvals_services.approval_decide(
                request=ApprovalRequest.objects.get(pk=request.pk),
                user=deciders[i],
                decision="approve",
                expected_version=request.version,
            )
            outcomes.append("won")
        except Exception as lost:  # noqa: BLE001  (each loser is told why)
            outcomes.append(type(lost).__name__)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(len(deciders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("won") == 1, outcomes
    wait_for(lambda: finished([run.id]), 60, cluster.logs)
    assert SandboxCall.objects.filter(connector="messaging", operation="send").count() == 1
    assert_invariants_hold()
