from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from approvals import services
from approvals.models import ApprovalRequest, ApprovalStatus, ApprovalVote
from core import services as core_services
from core.models import Event, Role, Tenant, User
from demo.models import SandboxCall
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_start
from tests.approvals.helpers import RESUMED, followup, pending_request, pump
from tests.concurrency import run_concurrently
from tests.conftest import make_member
from tests.dialects import RACING_THREADS, postgresql_only

pytestmark = [pytest.mark.both_dialects, pytest.mark.django_db(transaction=True)]

# The events a decision leaves on its run.
DECISION_VERBS = (
    "approval_vote",
    "approval_approved",
    "approval_rejected",
    "approval_changes_requested",
    "step_resumed",
)


def test_a_gated_step_waits_and_one_approval_resumes_it_once(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    run = followup(sandbox_acme)
    assert pump() == ["succeeded", "succeeded", "waiting_approval"]
    run.refresh_from_db()
    assert run.status == RunStatus.WAITING_APPROVAL
    request = pending_request(run)
    assert (request.version, request.artifact_version.number, request.step.key) == (1, 1, "send_message")
    assert request.artifact_version.content["subject"] == "Next steps for Company 7"
    assert not Step.objects.get(run=run, key="send_message").approval_requests.exclude(pk=request.pk).exists()

    decided = services.approval_decide(
        request=request, user=acme_operator, decision="approve", expected_version=1
    )
    assert (decided.status, decided.version, decided.decided_by) == ("approved", 2, acme_operator)
    assert Step.objects.get(run=run, key="send_message").status in RESUMED
    assert pump() == ["succeeded"]
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    [call] = SandboxCall.objects.filter(connector="messaging")
    assert call.request["subject"] == "Next steps for Company 7"


def test_a_repeated_or_stale_decision_changes_nothing_and_returns_the_current_state(
    sandbox_acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    run = followup(sandbox_acme)
    pump()
    request = pending_request(run)
    services.approval_decide(request=request, user=acme_operator, decision="approve", expected_version=1)
    with pytest.raises(services.DecisionConflict) as lost:
        services.approval_decide(request=request, user=acme_admin, decision="reject", expected_version=1)
    current = lost.value.current
    assert (current.status, current.version, current.decided_by, current.artifact_version.number) == (
        "approved", 2, acme_operator, 1,
    )  # fmt: skip
    assert Step.objects.get(run=run, key="send_message").status in RESUMED
    assert Event.objects.filter(subject=f"run:{run.id}", verb="step_resumed").count() == 1


def quorum_request(acme: Tenant) -> tuple[User, User, Run, ApprovalRequest]:
    """Two operators besides the run's starter, and a run waiting on a request that needs two."""
    second = make_member("second", acme, Role.OPERATOR)
    third = make_member("third", acme, Role.OPERATOR)
    run = run_start(tenant=acme, workflow="test.quorum", input={}, actor="operator").run
    pump()
    return second, third, run, pending_request(run)


def test_quorum_of_two_distinct_approvers_with_self_approval_blocked(
    acme: Tenant, acme_operator: User
) -> None:
    second, third, run, request = quorum_request(acme)
    assert request.required == 2
    with pytest.raises(services.DecisionForbidden, match="started this run"):
        services.approval_decide(request=request, user=acme_operator, decision="approve", expected_version=1)
    first_vote = services.approval_decide(
        request=request, user=second, decision="approve", expected_version=1
    )
    assert (first_vote.status, first_vote.approvals, first_vote.version) == ("pending", 1, 2)
    assert Step.objects.get(run=run, key="publish").status == StepStatus.WAITING_APPROVAL
    with pytest.raises(services.DecisionForbidden, match="already approved"):
        services.approval_decide(request=request, user=second, decision="approve", expected_version=2)
    assert ApprovalRequest.objects.get(pk=request.pk).version == 2, "a refused vote changes nothing"
    quorum = services.approval_decide(request=request, user=third, decision="approve", expected_version=2)
    assert (quorum.status, quorum.approvals) == ("approved", 2)
    assert ApprovalVote.objects.filter(request=request).count() == 2
    pump()
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED


def test_each_decision_leaves_its_event_heard_once_and_a_refused_vote_none(
    acme: Tenant, acme_operator: User
) -> None:
    second, third, run, request = quorum_request(acme)
    heard: list[tuple[int, str]] = []
    core_services.event_listener_register(listener := lambda event: heard.append((event.pk, event.verb)))
    try:
        services.approval_decide(request=request, user=second, decision="approve", expected_version=1)
        with pytest.raises(services.DecisionForbidden, match="already approved"):
            services.approval_decide(request=request, user=second, decision="approve", expected_version=2)
        services.approval_decide(request=request, user=third, decision="approve", expected_version=2)
    finally:
        core_services._event_listeners.remove(listener)
    events = Event.objects.filter(subject=f"run:{run.id}", verb__in=DECISION_VERBS).order_by("id")
    assert [(e.verb, e.actor, e.payload.get("version")) for e in events] == [
        ("approval_vote", "second", 2),
        ("approval_approved", "third", 3),
        ("step_resumed", "third", None),
    ]
    assert [heard_event for heard_event in heard if heard_event[1] in DECISION_VERBS] == [
        (e.pk, e.verb) for e in events
    ]  # each once, after its commit; none for the refused vote
    decided = {key: events[1].payload.get(key) for key in ("approval_id", "approvals", "required", "comment")}
    assert decided == {"approval_id": request.pk, "approvals": 2, "required": 2, "comment": ""}
    assert Run.objects.get(pk=run.pk).status == RunStatus.RUNNING


@postgresql_only("the statements PostgreSQL is sent")
def test_an_approval_writes_its_decision_vote_and_event_in_one_statement_and_the_resume_in_another(
    sandbox_acme: Tenant, acme_operator: User, settings: Any
) -> None:
    settings.RUNWARDEN_PREPARED_STATEMENTS = False  # the statements' own text is sent
    run = followup(sandbox_acme)
    pump()
    request = pending_request(run)
    with CaptureQueriesContext(connection) as captured:
        services.approval_decide(request=request, user=acme_operator, decision="approve", expected_version=1)
    sent = [q["sql"] for q in captured.captured_queries]
    [decision] = [sql for sql in sent if "approvals_approvalvote" in sql]
    assert "UPDATE approvals_approvalrequest" in decision and "INSERT INTO core_event" in decision
    [resume] = [sql for sql in sent if "step_resumed" in sql]
    assert "UPDATE runs_step" in resume and "UPDATE runs_run" in resume
    assert not [sql for sql in sent if "core_event" in sql and sql not in (decision, resume)]
    assert Step.objects.get(run=run, key="send_message").status in RESUMED
    assert Run.objects.get(pk=run.pk).status == RunStatus.RUNNING
    assert list(
        Event.objects.filter(subject=f"run:{run.id}", verb__in=DECISION_VERBS).values_list("verb", flat=True)
    ) == ["approval_approved", "step_resumed"]


def test_whoever_wrote_the_latest_version_cannot_approve_it(
    sandbox_acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    run = followup(sandbox_acme)
    pump()
    request = pending_request(run)
    services.artifact_edit(
        artifact=request.artifact,
        user=acme_operator,
        expected_version=1,
        content={"subject": "S", "body": "B"},
    )
    edited = pending_request(run)
    with pytest.raises(services.DecisionForbidden, match="wrote this version"):
        services.approval_decide(
            request=edited, user=acme_operator, decision="approve", expected_version=edited.version
        )
    services.approval_decide(
        request=edited, user=acme_admin, decision="approve", expected_version=edited.version
    )
    pump()
    assert SandboxCall.objects.get(connector="messaging").request["body"] == "B"


def test_a_reviewer_cannot_approve_an_operator_step(sandbox_acme: Tenant, acme_reviewer: User) -> None:
    run = followup(sandbox_acme)
    pump()
    with pytest.raises(services.DecisionForbidden, match="roles"):
        services.approval_decide(
            request=pending_request(run), user=acme_reviewer, decision="approve", expected_version=1
        )


def test_rejecting_fails_the_step_and_the_run(sandbox_acme: Tenant, acme_operator: User) -> None:
    run = followup(sandbox_acme)
    pump()
    services.approval_decide(
        request=pending_request(run),
        user=acme_operator,
        decision="reject",
        expected_version=1,
        comment="wrong tone",
    )
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert "wrong tone" in Step.objects.get(run=run, key="send_message").error
    assert not SandboxCall.objects.filter(connector="messaging").exists()


def test_requesting_changes_sends_the_run_back_to_its_drafting_step(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    run = followup(sandbox_acme)
    pump()
    first = pending_request(run)
    services.approval_decide(
        request=first, user=acme_operator, decision="request_changes", expected_version=1, comment="shorter"
    )
    assert Step.objects.get(run=run, key="draft_message").status == StepStatus.READY
    assert Step.objects.get(run=run, key="send_message").status == StepStatus.PENDING
    assert pump() == ["succeeded", "waiting_approval"]
    again = pending_request(run)
    assert again.pk != first.pk
    assert ApprovalRequest.objects.get(pk=first.pk).status == ApprovalStatus.CHANGES_REQUESTED
    assert Step.objects.get(run=run, key="draft_message").attempt == 2


@RACING_THREADS
@pytest.mark.timeout(240)
def test_the_timeout_fallback_and_a_human_racing_it_decide_exactly_once(
    acme: Tenant, acme_operator: User
) -> None:
    later = timezone.now() + timedelta(minutes=5)
    outcomes = {"approved": 0, "expired": 0}
    for _ in range(25):
        run = run_start(tenant=acme, workflow="test.timed_gate", input={}, actor="bot").run
        pump()
        request = pending_request(run)
        assert request.expires_at is not None

        def race(i: int, request: ApprovalRequest = request) -> object:
            if i == 0:
                return services.approvals_expire(now=later)
            return services.approval_decide(
                request=request, user=acme_operator, decision="approve", expected_version=1
            )

        results = run_concurrently(race, 2)
        unexpected = [
            r
            for r in results
            if isinstance(r, BaseException) and not isinstance(r, services.DecisionConflict)
        ]
        assert not unexpected, unexpected
        final = ApprovalRequest.objects.get(pk=request.pk)
        step = Step.objects.get(run=run, key="timed_send")
        assert final.status in ("approved", "expired")
        assert final.version == 2, "exactly one decision was applied"
        decisions = Event.objects.filter(
            subject=f"run:{run.id}", verb__in=["approval_approved", "approval_expired"]
        ).count()
        assert decisions == 1
        if final.status == "approved":
            assert step.status in RESUMED
        else:
            assert step.status == StepStatus.FAILED
        outcomes[final.status] += 1
        Run.objects.filter(pk=run.pk).update(status=RunStatus.CANCELLED)
        Step.objects.filter(run=run).update(status=StepStatus.CANCELLED)
    assert sum(outcomes.values()) == 25


def test_an_escalated_approval_can_only_be_decided_by_an_admin(
    acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    run = run_start(tenant=acme, workflow="test.escalating_gate", input={}, actor="bot").run
    pump()
    request = pending_request(run)
    assert services.approvals_expire(now=timezone.now() + timedelta(minutes=5)) == 1
    assert services.approvals_expire(now=timezone.now() + timedelta(minutes=10)) == 0, "fires once"
    escalated = ApprovalRequest.objects.get(pk=request.pk)
    assert (escalated.status, escalated.escalated, escalated.version) == ("pending", True, 2)
    with pytest.raises(services.DecisionForbidden, match="admin"):
        services.approval_decide(
            request=escalated, user=acme_operator, decision="approve", expected_version=2
        )
    services.approval_decide(request=escalated, user=acme_admin, decision="approve", expected_version=2)
    pump()
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED


def test_a_low_risk_approval_auto_approves_on_timeout(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow="test.auto_gate", input={}, actor="bot").run
    pump()
    request = pending_request(run)
    assert services.approvals_expire(now=timezone.now() + timedelta(minutes=5)) == 1
    assert ApprovalRequest.objects.get(pk=request.pk).status == "approved"
    pump()
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert Step.objects.get(run=run, key="auto_publish").output == {"published": "low risk"}
    assert Event.objects.filter(subject=f"run:{run.id}", verb="approval_auto_approved").count() == 1


def test_auto_approve_is_refused_on_risky_lanes() -> None:
    from runs.definitions import ApprovalPolicy, Workflow, WorkflowDefinitionError

    with pytest.raises(WorkflowDefinitionError, match="low-risk"):
        Workflow(key="x").step(lane="external", approval=ApprovalPolicy(on_timeout="auto_approve"))(
            lambda ctx: None
        )
