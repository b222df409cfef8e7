"""Governed tool calls across real worker processes (Celery's threads pool, the dispatcher,
PostgreSQL, Redis): a tool's cap counts the calls agents make mid-step together with the
steps admitted under that tool, never passed whichever process grants; every call once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, ApprovalStatus, ConflictArtifact, ConflictKind
from core.models import Lease, Tenant, TenantQuota, User
from core.workers import live_pools
from runs.invariants import check_invariants
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus, ToolCall, ToolCallStatus
from runs.services import run_start
from tests.concurrency import sampled_peaks
from tests.runs.cluster import Cluster, finished, wait_for

CRM_CAP = 2
AGENTS = 20
CALLS = 3
DECLARED = 6


@pytest.mark.timeout(240)
@pytest.mark.django_db(transaction=True)
def test_a_tool_cap_of_two_holds_for_agent_calls_and_declared_steps_across_workers(
    acme: Tenant, tmp_path: Path
) -> None:
    """20 agent runs of 3 crm calls each and 6 steps declared with the crm tool, on two worker
    processes of 20 slots: the CRM never serves more than 2 at once (counted by the CRM itself,
    and sampled from the database), every call is served exactly once."""
    outside = redis.Redis.from_url(settings.REDIS_URL)
    outside.delete("test:crm:in_flight", "test:crm:most", *outside.keys("test:crm:served:*"))
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    caps = {"global": 1000, "tenant_default": 1000, "lane": {"draft": 1000}, "tool": {"crm": CRM_CAP}}
    cluster = Cluster(tmp_path, RUNWARDEN_CAPS=json.dumps(caps))
    try:
        for name in ("agents1", "agents2"):
            cluster.worker(name, ["draft"], concurrency=20, pool="threads")
        wait_for(lambda: sum(pool.slots for pool in live_pools()) == 40, 60, cluster.logs)
        cluster.dispatcher()
        agents = [
            run_start(tenant=acme, workflow="test.crm_agent", input={"calls": CALLS}, actor="t").run.pk
            for _ in range(AGENTS)
        ]
        declared = [
            run_start(tenant=acme, workflow="test.crm_step", input={}, actor="t").run.pk
            for _ in range(DECLARED)
        ]
        ids = agents + declared

        def measure() -> dict[str, int]:
            now = timezone.now()
            live = Lease.objects.filter(released_at__isnull=True, expires_at__gt=now)
            calls = ToolCall.objects.filter(
                run_id__in=agents,
                status=ToolCallStatus.RUNNING,
                lease_id__in=live.filter(key__startswith="toolcall:").values("id"),
            ).count()
            steps = Step.objects.filter(
                Q(status=StepStatus.RUNNING) | Q(status=StepStatus.LEASED), run_id__in=declared, tool="crm"
            ).count()
            return {"crm": calls + steps, "agent_steps_running": Step.objects.filter(
                run_id__in=agents, status=StepStatus.RUNNING
            ).count()}  # fmt: skip

        with sampled_peaks(measure, every=0.01) as peaks:
            wait_for(lambda: finished(ids), 180, cluster.logs)
    finally:
        cluster.stop()
    print(f"{AGENTS} agents x {CALLS} crm calls + {DECLARED} crm steps, cap {CRM_CAP}: peaks {dict(peaks)}")
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}
    assert int(outside.get("test:crm:most") or 0) <= CRM_CAP  # the CRM's own count
    assert peaks["crm"] <= CRM_CAP, peaks  # the database's, sampled
    assert peaks["agent_steps_running"] > CRM_CAP, peaks  # the agents ran side by side; their calls waited
    served = {key.decode(): int(outside.get(key) or 0) for key in outside.keys("test:crm:served:*")}
    expected = {f"test:crm:served:{run_id}:{n}" for run_id in agents for n in range(CALLS)}
    expected |= {f"test:crm:served:{run_id}:step" for run_id in declared}
    assert set(served) == expected and set(served.values()) == {1}, served
    waited = ToolCall.objects.filter(run_id__in=agents, cap_wait_ms__gt=0).count()
    assert waited > 0  # some calls waited for a slot, recorded for the run page
    assert not Lease.objects.filter(
        key__startswith="toolcall:", released_at__isnull=True, expires_at__gt=timezone.now()
    ).exists()
    assert check_invariants() == []


@pytest.mark.timeout(120)
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_while_the_approved_call_is_in_flight_never_sends_it_twice(
    acme: Tenant, acme_operator: User, tmp_path: Path
) -> None:
    """The step parks for the payment's approval; approved, it runs again and the payment's
    proposal is recorded; the worker is SIGKILLed in the middle of the call. The heir finds the
    proposal with no outcome and a dead proposer: ambiguous, for a reviewer, never sent again."""
    outside = redis.Redis.from_url(settings.REDIS_URL)
    cluster = Cluster(tmp_path)
    try:
        doomed = cluster.worker("doomed", ["draft"], concurrency=4, pool="threads")
        cluster.dispatcher()
        run = run_start(tenant=acme, workflow="test.approved_payment", input={"seconds": 30}, actor="t").run
        pending = ApprovalRequest.objects.filter(run=run, status=ApprovalStatus.PENDING)
        wait_for(pending.exists, 30, cluster.logs)
        assert Step.objects.get(run=run).status == StepStatus.WAITING_APPROVAL
        approvals.approval_decide(
            request=pending.get(), user=acme_operator, decision="approve", expected_version=1
        )
        wait_for(lambda: outside.get(f"test:pay:started:{run.pk}") is not None, 30, cluster.logs)
        assert SideEffect.objects.get(run=run, kind="payments").status == EffectStatus.PROPOSED
        os.killpg(doomed.pid, signal.SIGKILL)
        cluster.worker("heir", ["draft"], concurrency=4, pool="threads")
        wait_for(lambda: Run.objects.get(pk=run.pk).status == RunStatus.CONFLICT, 60, cluster.logs)
        conflict = ConflictArtifact.objects.get(run=run)
        assert conflict.kind == ConflictKind.LEASE_EXPIRED_WITH_PENDING_EFFECT
        assert int(outside.get(f"test:pay:started:{run.pk}") or 0) == 1  # never a second time
        assert SideEffect.objects.get(run=run, kind="payments").status == EffectStatus.PROPOSED
        # The heir goes on with other work.
        other = run_start(tenant=acme, workflow="test.crm_step", input={}, actor="t").run
        wait_for(lambda: finished([other.pk]), 30, cluster.logs)
        assert Run.objects.get(pk=other.pk).status == RunStatus.SUCCEEDED
    finally:
        cluster.stop()
    assert check_invariants() == []
