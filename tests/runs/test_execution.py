from __future__ import annotations

import os
import signal
import time
from collections import defaultdict

import pytest
from django.test import override_settings

from core.models import Event, Tenant, TenantQuota
from demo.models import SandboxCall, SandboxContact
from runs.dispatch import dispatch_round
from runs.models import Run, SideEffect, Step, StepStatus
from runs.services import run_start
from tests.concurrency import sampled_peaks
from tests.dialects import REAL_WORKERS
from tests.runs.cluster import Cluster, calls_per_key, crm_runs, finished, private_redis, wait_for

pytestmark = pytest.mark.both_dialects


@REAL_WORKERS
@pytest.mark.timeout(180)
def test_demo_workflows_without_approval_run_end_to_end_on_real_workers(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("w1")
    cluster.beat()
    enrich = run_start(tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": 7}, actor="t").run
    update = run_start(
        tenant=sandbox_acme,
        workflow="demo.crm_update",
        input={"contact_id": 2, "changes": {"stage": "won"}},
        actor="t",
    ).run
    wait_for(lambda: finished([enrich.id, update.id]), 60, cluster.logs)
    enrich.refresh_from_db()
    update.refresh_from_db()
    assert (enrich.status, update.status) == ("succeeded", "succeeded"), cluster.logs()
    assert list(enrich.steps.order_by("position").values_list("key", "status", "attempt")) == [
        ("fetch_lead", "succeeded", 1),
        ("summarize", "succeeded", 1),
        ("draft_note", "succeeded", 1),
    ]
    assert "Lead 7" in enrich.steps.get(key="draft_note").output["note"]
    contact = SandboxContact.objects.get(tenant=sandbox_acme, number=2)
    assert (contact.stage, contact.version) == ("won", 2)
    effect = SideEffect.objects.get(run=update)
    assert (effect.status, effect.external_ref) == ("committed", "contact:2@v2")


@REAL_WORKERS
@pytest.mark.timeout(240)
def test_concurrent_updates_of_the_same_contacts_never_overlap(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    for name in ("w1", "w2", "w3"):
        cluster.worker(name)
    cluster.beat()
    runs = [
        run_start(
            tenant=sandbox_acme,
            workflow="demo.crm_update",
            input={"contact_id": 1 + n % 3, "changes": {"stage": f"stage-{n}"}},
            actor="t",
        ).run
        for n in range(20)
    ]
    ids = [run.id for run in runs]
    wait_for(lambda: finished(ids), 180, cluster.logs)
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}, (
        cluster.logs()
    )
    # Each contact's read-then-write must not interleave with another run's.
    intervals: dict[str, list[tuple[object, object]]] = defaultdict(list)
    for step in Step.objects.filter(run_id__in=ids):
        intervals[step.lock_keys[0]].append((step.started_at, step.finished_at))
    assert sorted(intervals) == ["crm_contact:1", "crm_contact:2", "crm_contact:3"]
    for key, spans in intervals.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"two runs held {key} at once"
    versions = dict(
        SandboxContact.objects.filter(tenant=sandbox_acme, number__lte=3).values_list("number", "version")
    )
    assert versions == {1: 8, 2: 8, 3: 7}, "every update applied exactly once"
    assert SandboxCall.objects.filter(operation="update_contact").count() == 20


@pytest.mark.timeout(180)
def test_a_flooding_tenant_does_not_delay_another_tenants_first_step(acme: Tenant, globex: Tenant) -> None:
    for n in range(500):
        run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": n + 1}, actor="flood")
    late = [
        run_start(tenant=globex, workflow="demo.enrich_lead", input={"lead_id": n + 1}, actor="b").run
        for n in range(5)
    ]
    first_round = dispatch_round()
    admitted_runs = set(
        Step.objects.filter(pk__in=[a.step_id for a in first_round]).values_list("run_id", flat=True)
    )
    assert admitted_runs & {run.id for run in late}, "globex's first step must be admitted in the first round"
    assert len(first_round) >= 2


@pytest.mark.timeout(240)
@override_settings(
    RUNWARDEN_CAPS={"global": 50, "tenant_default": 10, "workflow": {}, "lane": {}, "tool": {"crm": 1}}
)
@REAL_WORKERS
def test_observed_concurrency_never_exceeds_the_tenant_and_tool_caps(
    transactional_db: None, sandbox_acme: Tenant, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    TenantQuota.objects.filter(tenant=sandbox_acme).update(max_concurrent_steps=2)
    cluster = Cluster(tmp_path, RUNWARDEN_CAPS='{"tool": {"crm": 1}, "lane": {"read": 20}}')
    try:
        cluster.worker("w1", concurrency=4)
        cluster.beat()
        crm = [
            run_start(
                tenant=sandbox_acme, workflow="test.busy_crm", input={"hold_seconds": 0.3}, actor="t"
            ).run
            for _ in range(6)
        ]
        other = [
            run_start(
                tenant=sandbox_acme, workflow="test.sleepy", input={"sleep_seconds": 0.3}, actor="t"
            ).run
            for _ in range(6)
        ]
        ids = [run.id for run in crm + other]

        def active() -> dict[str, int]:
            steps = Step.objects.filter(run_id__in=ids, status__in=[StepStatus.LEASED, StepStatus.RUNNING])
            return {"tenant": steps.count(), "crm": steps.filter(tool="crm").count()}

        with sampled_peaks(active, every=0.01) as peaks:
            wait_for(lambda: finished(ids), 200, cluster.logs)
    finally:
        cluster.stop()
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}
    assert peaks["tenant"] <= 2, peaks
    assert peaks["crm"] <= 1, peaks
    assert peaks["tenant"] == 2, "the test must actually reach the cap"


def _pid_of_attempt(run: Run, attempt: int) -> int | None:
    step = run.steps.get()
    data = step.checkpoint or {}
    return data.get("pid") if data.get("attempt") == attempt and step.status == StepStatus.RUNNING else None


@REAL_WORKERS
@pytest.mark.timeout(180)
def test_a_worker_killed_mid_step_is_retried_elsewhere_and_the_effect_happens_once(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    first, second = cluster.worker("w1", ["external"]), cluster.worker("w2", ["external"])
    cluster.worker("maint", ["maintenance"])
    cluster.beat()
    run = run_start(tenant=sandbox_acme, workflow="test.slow_send", input={"work_seconds": 3}, actor="t").run
    wait_for(lambda: _pid_of_attempt(run, 1), 60, cluster.logs)
    victim = _pid_of_attempt(run, 1)
    assert victim in (first.pid, second.pid)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: finished([run.id]), 90, cluster.logs)
    run.refresh_from_db()
    step = run.steps.get()
    assert run.status == "succeeded", cluster.logs()
    assert step.attempt == 2
    assert step.output["pid"] != victim
    assert SandboxCall.objects.filter(connector="messaging", operation="send").count() == 1
    assert Event.objects.filter(subject=f"run:{run.id}", verb="step_lease_expired").count() == 1


@REAL_WORKERS
@pytest.mark.timeout(180)
def test_a_paused_worker_that_resumes_late_is_fenced_out(sandbox_acme: Tenant, cluster: Cluster) -> None:
    first, second = cluster.worker("w1", ["external"]), cluster.worker("w2", ["external"])
    cluster.worker("maint", ["maintenance"])
    cluster.beat()
    run = run_start(tenant=sandbox_acme, workflow="test.sleepy", input={"sleep_seconds": 3}, actor="t").run
    wait_for(lambda: _pid_of_attempt(run, 1), 60, cluster.logs)
    zombie = _pid_of_attempt(run, 1)
    assert zombie in (first.pid, second.pid)
    os.kill(zombie, signal.SIGSTOP)
    try:
        # Paused past its 2 s lease: the reaper re-dispatches to the other worker, which finishes.
        wait_for(lambda: finished([run.id]), 90, cluster.logs)
    finally:
        os.kill(zombie, signal.SIGCONT)
    step = Step.objects.get(run=run)
    new_holder = step.output["pid"]
    assert new_holder != zombie
    # The zombie wakes up, finishes its sleep and tries to write its result: refused.
    wait_for(
        lambda: Event.objects.filter(verb="stale_token_write", subject=f"step:{step.pk}").exists(),
        30,
        cluster.logs,
    )
    step.refresh_from_db()
    assert step.output["pid"] == new_holder
    assert (step.status, step.attempt) == ("succeeded", 2)
    # The refused write also becomes a conflict artifact a reviewer can see and acknowledge.
    from approvals.models import ConflictArtifact
    from approvals.services import conflict_resolve
    from tests.conftest import make_member

    # The artifact follows the event: the approvals app opens it once the refusal commits.
    wait_for(
        lambda: ConflictArtifact.objects.filter(kind="stale_token_write", step=step).exists(),
        30,
        cluster.logs,
    )
    conflict = ConflictArtifact.objects.get(kind="stale_token_write", step=step)
    assert conflict.proposed["output"] == {"pid": zombie}
    assert conflict.current["output"] == {"pid": new_holder}
    reviewer = make_member("reviewer", sandbox_acme, "reviewer")
    resolved = conflict_resolve(
        conflict=conflict, user=reviewer, expected_version=1, resolution="acknowledge"
    )
    assert resolved.status == "resolved"


@REAL_WORKERS
@pytest.mark.timeout(240)
def test_runs_finish_exactly_once_across_a_redis_restart(
    sandbox_acme: Tenant, transactional_db: None, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    with private_redis() as (redis_url, set_running):
        cluster = Cluster(tmp_path, redis_url=redis_url, RUNWARDEN_SANDBOX_LATENCY_MS="150")
        try:
            cluster.worker("w1")
            cluster.worker("w2")
            cluster.beat()
            ids = crm_runs(sandbox_acme, 30)
            wait_for(
                lambda: Run.objects.filter(pk__in=ids, status="succeeded").count() >= 5, 60, cluster.logs
            )
            set_running(False)  # Redis goes away with whatever it held: queued tasks are lost
            in_flight = Run.objects.filter(pk__in=ids).exclude(status="succeeded").count()
            time.sleep(1)  # the outage (not a wait for anything): Redis is down for a second
            set_running(True)
            wait_for(lambda: finished(ids), 200, cluster.logs)
        finally:
            cluster.stop()
    assert in_flight >= 10, "the restart must hit a batch in progress"
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}, (
        cluster.logs()
    )
    per_run = calls_per_key("update_contact")
    assert len(per_run) == 30
    assert set(per_run) == {1}, "an update ran twice"
