"""`demo_traffic --scenario contention` against real worker processes: every page gets real
content — a lock queue, a version conflict, an ambiguous effect, a duplicate trigger, an
approval invalidated by an agent's edit."""

from __future__ import annotations

from pathlib import Path

import pytest

from approvals.models import ApprovalRequest, ConflictArtifact
from core.models import Event, Tenant
from demo.scenarios import contention, outside_agent
from runs.models import Run, SideEffect, Step
from tests.runs.cluster import Cluster, wait_for
from tests.servers import base_env, console_server, database_url


@pytest.mark.timeout(240)
def test_the_contention_scenario_produces_waits_and_every_kind_of_conflict_it_promises(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("w1", concurrency=2)
    cluster.worker("agents", ["draft"], concurrency=10, pool="threads")  # as the Procfile's draft lane
    cluster.beat()
    said: list[str] = []
    contention(sandbox_acme, said.append, wait_seconds=90, hold_seconds=3)
    queue = Run.objects.filter(workflow="demo.account_review", input__contact_id=1)
    assert queue.count() == 4
    wait_for(
        lambda: (
            {"entity_version_mismatch", "duplicate_trigger_payload", "lease_expired_with_pending_effect"}
            <= set(ConflictArtifact.objects.values_list("kind", flat=True))
        ),
        120,
        lambda: cluster.logs() + "\n".join(said),
    )
    assert ApprovalRequest.objects.filter(status="invalidated").exists(), "the agent's edit invalidated it"
    # The merges' deadlock was found and broken; both merged in the end.
    merges = Run.objects.filter(workflow="demo.merge_contacts")
    wait_for(lambda: merges.filter(status="succeeded").count() == 2, 60, cluster.logs)
    assert Event.objects.filter(verb="deadlock_detected").count() == 1
    # The agent's refund waits mid-step for a human: a call's approval, in the inbox.
    refund = ApprovalRequest.objects.get(run__workflow="demo.support_agent", status="pending")
    assert (refund.artifact.kind, refund.artifact_version.content["amount"]) == ("payments", "150.00")
    assert ApprovalRequest.objects.filter(status="pending").exists(), "its new version waits"
    wait_for(lambda: queue.filter(status="succeeded").count() == 4, 90, cluster.logs)
    # They queued for crm_contact:1: one review after another (two worker slots were free).
    reviews = list(Step.objects.filter(run__in=queue, key="review_contact").order_by("started_at"))
    for earlier, later in zip(reviews, reviews[1:], strict=False):
        assert earlier.finished_at is not None and later.started_at is not None
        assert later.started_at >= earlier.finished_at, "two reviews held crm_contact:1 at once"


@pytest.mark.timeout(120)
@pytest.mark.django_db(transaction=True)
def test_the_outside_scenario_speaks_only_http_through_the_client(
    sandbox_acme: Tenant, tmp_path: Path
) -> None:
    env = base_env(DEBUG="1", DATABASE_URL=database_url())
    said: list[str] = []
    with console_server(env, tmp_path / "serve.log") as url:
        outside_agent(sandbox_acme, said.append, base_url=url, wait_seconds=0.5)
    effect = SideEffect.objects.get(tenant=sandbox_acme, kind="crm.note")
    assert (effect.status, effect.run_id, effect.attempts) == (
        "committed",
        None,
        1,
    )  # asked twice, written once
    decision = Run.objects.get(workflow="runwarden.outside_approval")
    assert decision.input["action"] == {"payment_id": "pay_8", "amount": "180.00"}
    assert len(said) == 2 and "pending" in said[1], said
