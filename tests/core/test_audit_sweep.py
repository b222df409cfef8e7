# ruff: noqa: E501
"""The audit sweep: every human act — an approval, an edit, a resolution, a cancel, a retry, a
replay, a quota, member or connection change — is an event naming its actor, written with the
change. (That events have no update or delete path is tests/core/test_events.py.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from approvals import services as approvals
from approvals.models import ConflictArtifact
from core import connections as core_connections
from core import services as core
from core.models import Event, Tenant, User
from runs import services as runs
from runs.models import Run
from runs.services import TriggerPayloadMismatch, run_start
from tests.approvals.helpers import pending_request, pump


def act(actor: User, verbs: set[str], action: Callable[[], object]) -> None:
    """``action`` must leave an event with one of ``verbs`` whose actor is ``actor``."""
    before = Event.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    action()
    new = set(Event.objects.filter(pk__gt=before, actor=actor.get_username()).values_list("verb", flat=True))
    assert new & verbs, (actor.get_username(), verbs, new)


def test_every_human_act_is_an_event_with_its_actor(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User, acme_admin: User
) -> None:
    gated = run_start(
        tenant=sandbox_acme, workflow="demo.lead_followup", input={"lead_id": 1, "contact_id": 1}, actor="bot"
    ).run
    pump()
    request = pending_request(gated)
    act(acme_operator, {"artifact_edited"}, lambda: approvals.artifact_edit(
        artifact=request.artifact, user=acme_operator, expected_version=1, content={"subject": "s", "body": "b"}
    ))  # fmt: skip
    fresh = pending_request(gated)
    act(acme_admin, {"approval_approved"}, lambda: approvals.approval_decide(
        request=fresh, user=acme_admin, decision="approve", expected_version=fresh.version
    ))  # fmt: skip

    run_start(
        tenant=sandbox_acme,
        workflow="demo.enrich_lead",
        input={"lead_id": 1},
        actor="bot",
        trigger_event_id="t-1",
    )
    with pytest.raises(TriggerPayloadMismatch):
        run_start(
            tenant=sandbox_acme,
            workflow="demo.enrich_lead",
            input={"lead_id": 2},
            actor="bot",
            trigger_event_id="t-1",
        )
    conflict = ConflictArtifact.objects.get(kind="duplicate_trigger_payload")
    act(acme_reviewer, {"conflict_resolved"}, lambda: approvals.conflict_resolve(
        conflict=conflict, user=acme_reviewer, expected_version=conflict.version, resolution="acknowledge"
    ))  # fmt: skip

    victim = run_start(
        tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": 3}, actor="bot"
    ).run
    act(acme_operator, {"cancelled"}, lambda: runs.run_cancel(run=victim, actor=acme_operator.get_username()))
    act(
        acme_operator,
        {"run_retried"},
        lambda: runs.run_retry(run=Run.objects.get(pk=victim.pk), actor="operator"),
    )
    act(
        acme_operator,
        {"run_replayed"},
        lambda: runs.run_replay(run=Run.objects.get(pk=victim.pk), actor="operator"),
    )

    act(
        acme_admin,
        {"quota_updated"},
        lambda: core.tenant_quota_update(tenant=sandbox_acme, actor=acme_admin, changes={"weight": 2}),
    )
    act(acme_admin, {"membership_added"}, lambda: core.membership_add(
        tenant=sandbox_acme, actor=acme_admin, username="newcomer", role="operator", password="long-enough-pass-1"
    ))  # fmt: skip
    newcomer = User.objects.get(username="newcomer")
    act(
        acme_admin,
        {"membership_role_changed"},
        lambda: core.membership_set_role(
            tenant=sandbox_acme, actor=acme_admin, user=newcomer, role="reviewer"
        ),
    )
    act(
        acme_admin,
        {"membership_revoked"},
        lambda: core.membership_revoke(tenant=sandbox_acme, user=newcomer, actor=acme_admin),
    )
    act(
        acme_admin,
        {"environment_added"},
        lambda: core_connections.environment_add(tenant=sandbox_acme, name="qa", actor="admin"),
    )
    added = core_connections.connection_add(
        tenant=sandbox_acme, environment="qa", provider="crm", name="crm-qa", actor="admin"
    )
    assert Event.objects.filter(
        actor="admin", subject=f"connection:{added.pk}", verb="connection_added"
    ).exists()
    act(acme_admin, {"connection_changed"}, lambda: core_connections.connection_update(
        connection=added, actor="admin", archived=True
    ))  # fmt: skip
