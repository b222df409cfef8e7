from __future__ import annotations

import pytest

from approvals import services
from approvals.models import ApprovalStatus, Artifact, ConflictArtifact, ConflictStatus
from core.models import Role, Tenant, User
from demo.models import SandboxCall, SandboxContact
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus
from runs.services import TriggerPayloadMismatch, run_create, run_start
from tests.approvals.helpers import pending_request, pump
from tests.concurrency import run_concurrently
from tests.conftest import make_member
from tests.dialects import RACING_THREADS, REAL_WORKERS
from tests.runs.cluster import Cluster, wait_for

pytestmark = [pytest.mark.both_dialects, pytest.mark.django_db(transaction=True)]


def settled(run: Run, *statuses: str) -> bool:
    run.refresh_from_db()
    return run.status in statuses


def resolve(conflict: ConflictArtifact, user: User, resolution: str, **kwargs: str) -> ConflictArtifact:
    return services.conflict_resolve(
        conflict=conflict, user=user, expected_version=conflict.version, resolution=resolution, **kwargs
    )


@RACING_THREADS
def test_racing_deliveries_with_two_payloads_make_one_run_and_conflicts_for_the_others(
    acme: Tenant, acme_reviewer: User
) -> None:
    def deliver(i: int) -> object:
        return run_create(
            tenant=acme,
            workflow="demo.enrich_lead",
            input={"lead_id": i % 2},
            actor=f"hook{i}",
            trigger_event_id="evt-9",
        )

    results = run_concurrently(deliver, 10)
    refused = [r for r in results if isinstance(r, TriggerPayloadMismatch)]
    assert Run.objects.count() == 1
    assert refused, "half of the deliveries carried the other payload"
    assert not [
        r for r in results if isinstance(r, BaseException) and not isinstance(r, TriggerPayloadMismatch)
    ]
    conflicts = ConflictArtifact.objects.filter(kind="duplicate_trigger_payload")
    assert conflicts.count() == len(refused)
    conflict = conflicts.first()
    assert conflict is not None
    assert conflict.target_key == "trigger:evt-9"
    assert conflict.current["input"] != conflict.proposed["input"]
    done = resolve(conflict, acme_reviewer, "acknowledge", note="sender fixed")
    assert (done.status, done.resolved_by) == (ConflictStatus.RESOLVED, acme_reviewer)


@RACING_THREADS
def test_two_edits_from_the_same_version_keep_one_and_record_the_other(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User
) -> None:
    editors = [make_member(f"editor{i}", sandbox_acme, Role.OPERATOR) for i in range(6)]
    run = run_start(
        tenant=sandbox_acme, workflow="demo.lead_followup", input={"lead_id": 7, "contact_id": 1}, actor="bot"
    ).run
    pump()
    artifact = Artifact.objects.get(run=run)

    def edit(i: int) -> object:
        return services.artifact_edit(
            artifact=artifact,
            user=editors[i],
            expected_version=1,
            content={"subject": f"by {i}", "body": "x"},
        )

    results = run_concurrently(edit, 6)
    written = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, services.EditConflict)]
    assert (len(written), len(lost)) == (1, 5), results
    assert Artifact.objects.get(pk=artifact.pk).latest_version == 2
    conflicts = list(ConflictArtifact.objects.filter(kind="concurrent_edit").order_by("id"))
    assert len(conflicts) == 5
    assert {c.current["version"] for c in conflicts} == {2}
    # One reviewer applies a lost edit on top (version 3, approvals invalidated), another keeps the winner.
    applied = resolve(conflicts[0], acme_reviewer, "apply_proposed")
    assert applied.status == "resolved"
    assert Artifact.objects.get(pk=artifact.pk).latest_version == 3
    assert pending_request(run).artifact_version.content == conflicts[0].proposed["content"]
    resolve(conflicts[1], acme_reviewer, "keep_current")
    assert Artifact.objects.get(pk=artifact.pk).latest_version == 3
    with pytest.raises(services.ResolutionConflict):
        services.conflict_resolve(
            conflict=conflicts[1], user=acme_reviewer, expected_version=1, resolution="keep_current"
        )


@REAL_WORKERS
@pytest.mark.timeout(180)
def test_an_edit_after_approval_stops_the_send_and_approving_the_new_version_sends_it(
    sandbox_acme: Tenant, acme_operator: User, acme_admin: User, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    cluster = Cluster(tmp_path, RUNWARDEN_SANDBOX_LATENCY_MS="1500")
    try:
        cluster.worker("w1")
        cluster.beat()
        run = run_start(
            tenant=sandbox_acme,
            workflow="demo.lead_followup",
            input={"lead_id": 7, "contact_id": 1},
            actor="bot",
        ).run
        wait_for(lambda: settled(run, RunStatus.WAITING_APPROVAL), 60, cluster.logs)
        first = pending_request(run)
        services.approval_decide(request=first, user=acme_operator, decision="approve", expected_version=1)
        send_step = Step.objects.get(run=run, key="send_message")
        # The send started with the approval of v1 (it now reads the contact, 1.5 s); edit now.
        wait_for(lambda: Step.objects.get(pk=send_step.pk).status == StepStatus.RUNNING, 30, cluster.logs)
        services.artifact_edit(
            artifact=first.artifact,
            user=acme_operator,
            expected_version=1,
            content={"subject": "Edited", "body": "New text"},
        )
        wait_for(lambda: settled(run, RunStatus.CONFLICT), 30, cluster.logs)
        assert not SandboxCall.objects.filter(connector="messaging").exists(), (
            "nothing may be sent after the edit"
        )
        conflict = ConflictArtifact.objects.get(kind="stale_approval", step=send_step)
        assert conflict.status == "open"
        assert ApprovalRequest_status(first.pk) == ApprovalStatus.INVALIDATED
        # Approving the edited version (by someone who did not write it) settles it and sends v2.
        second = pending_request(run)
        assert second.artifact_version.number == 2
        services.approval_decide(
            request=second, user=acme_admin, decision="approve", expected_version=second.version
        )
        wait_for(lambda: settled(run, RunStatus.SUCCEEDED), 60, cluster.logs)
    finally:
        cluster.stop()
    [sent] = SandboxCall.objects.filter(connector="messaging")
    assert (sent.request["subject"], sent.request["body"]) == ("Edited", "New text")
    conflict.refresh_from_db()
    assert (conflict.status, conflict.resolution) == ("resolved", "approved_new_version")


def ApprovalRequest_status(pk: int) -> str:  # noqa: N802
    from approvals.models import ApprovalRequest

    return ApprovalRequest.objects.get(pk=pk).status


@REAL_WORKERS
@pytest.mark.timeout(180)
@pytest.mark.parametrize("died_after_send", [True, False])
def test_a_worker_dying_mid_send_leaves_an_ambiguous_effect_that_a_reviewer_settles(
    sandbox_acme: Tenant, acme_reviewer: User, cluster: Cluster, died_after_send: bool
) -> None:
    cluster.worker("w1", ["external"])
    cluster.worker("w2", ["external"])
    cluster.worker("maint", ["maintenance"])
    cluster.beat()
    run = run_start(
        tenant=sandbox_acme,
        workflow="test.crash_on_send",
        input={"die_after_send": died_after_send},
        actor="bot",
    ).run
    wait_for(lambda: settled(run, RunStatus.CONFLICT), 60, cluster.logs)
    effect = SideEffect.objects.get(run=run)
    assert effect.status == EffectStatus.PROPOSED
    conflict = ConflictArtifact.objects.get(kind="lease_expired_with_pending_effect", run=run)
    assert conflict.effect_id == effect.pk
    sends_before = SandboxCall.objects.filter(connector="messaging").count()
    assert sends_before == (1 if died_after_send else 0)
    if died_after_send:
        # The reviewer checked the provider: it was sent. The step finishes without sending again.
        ref = SandboxCall.objects.get(connector="messaging").response["message_id"]
        resolve(
            conflict, acme_reviewer, "mark_effect_committed", external_ref=ref, note="seen in provider log"
        )
    else:
        # Not sent: retry with the same idempotency key.
        resolve(conflict, acme_reviewer, "mark_effect_not_sent", note="nothing in provider log")
    wait_for(lambda: settled(run, RunStatus.SUCCEEDED), 60, cluster.logs)
    assert SandboxCall.objects.filter(connector="messaging").count() == 1, "exactly one send in the end"
    effect.refresh_from_db()
    assert effect.status == EffectStatus.COMMITTED


@REAL_WORKERS
@pytest.mark.timeout(180)
@pytest.mark.parametrize("resolution", ["apply_proposed", "keep_current"])
def test_a_record_changed_between_read_and_write_becomes_a_conflict(
    sandbox_acme: Tenant, acme_reviewer: User, tmp_path, resolution: str
) -> None:  # type: ignore[no-untyped-def]
    cluster = Cluster(tmp_path, RUNWARDEN_SANDBOX_LATENCY_MS="1000")
    try:
        cluster.worker("w1")
        cluster.beat()
        run = run_start(
            tenant=sandbox_acme,
            workflow="demo.crm_update",
            input={"contact_id": 4, "changes": {"stage": "won"}},
            actor="bot",
        ).run
        step = Step.objects.get(run=run)
        wait_for(lambda: Step.objects.get(pk=step.pk).status == StepStatus.RUNNING, 30, cluster.logs)
        # The step has read version 1 (the provider recorded the read) and its write is on its
        # way (1 s of provider latency): someone edits the CRM directly now.
        read = SandboxCall.objects.filter(tenant=sandbox_acme, operation="get_contact", target="contact:4")
        wait_for(read.exists, 30, cluster.logs)
        SandboxContact.objects.filter(tenant=sandbox_acme, number=4).update(
            name="Renamed by a human", version=2
        )
        wait_for(lambda: settled(run, RunStatus.CONFLICT), 30, cluster.logs)
        conflict = ConflictArtifact.objects.get(kind="entity_version_mismatch", run=run)
        assert conflict.target_key == "crm_contact:4"
        assert (conflict.current, conflict.proposed) == (
            {"version": 2}, {"expected_version": 1, "changes": {"stage": "won"}},
        )  # fmt: skip
        resolve(conflict, acme_reviewer, resolution)
        wait_for(lambda: settled(run, RunStatus.SUCCEEDED, RunStatus.CANCELLED), 60, cluster.logs)
    finally:
        cluster.stop()
    contact = SandboxContact.objects.get(tenant=sandbox_acme, number=4)
    if resolution == "apply_proposed":
        assert run.status == RunStatus.SUCCEEDED
        assert (contact.name, contact.stage, contact.version) == ("Renamed by a human", "won", 3)
    else:
        assert run.status == RunStatus.CANCELLED
        assert (contact.name, contact.stage, contact.version) == ("Renamed by a human", "new", 2)


def test_a_reviewer_resolution_needs_a_valid_choice(acme: Tenant, acme_reviewer: User) -> None:
    conflict = services.record_conflict(
        "duplicate_trigger_payload", tenant_id=acme.pk, target_key="trigger:x"
    )
    with pytest.raises(services.InvalidResolution, match="acknowledge"):
        resolve(conflict, acme_reviewer, "apply_proposed")
    assert ConflictArtifact.objects.get(pk=conflict.pk).status == "open"
