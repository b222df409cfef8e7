"""The demo's agent (``demo.support_agent``): a scripted planner decides each tool call at
runtime; a refund over the limit parks the step for a human, and after the approval the step
runs again from its start, every earlier call answered from its record, each call once."""

from __future__ import annotations

import pytest
from django.db.models import F

from approvals import services as approvals
from approvals.models import ApprovalRequest, ApprovalStatus
from core.models import Tenant, User
from demo.models import SandboxCall, SandboxContact
from runs.invariants import check_invariants
from runs.models import Run, RunStatus, Step, StepStatus, ToolCall
from runs.services import run_start
from tests.approvals.helpers import pump, pump_until


def ticket(tenant: Tenant, text: str, contact_id: int = 3) -> Run:
    return run_start(
        tenant=tenant,
        workflow="demo.support_agent",
        input={"contact_id": contact_id, "ticket": text, "payment_id": "pay_9"},
        actor="support-bot",
    ).run


def calls(operation: str) -> int:
    return SandboxCall.objects.filter(operation=operation, ok=True).count()


@pytest.mark.django_db(transaction=True)
def test_a_refund_over_the_limit_waits_for_a_human_then_every_call_happens_once(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    run = ticket(sandbox_acme, "I was charged twice, please refund 150")
    pump()
    assert Step.objects.get(run=run).status == StepStatus.WAITING_APPROVAL
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    assert request.artifact_version.content == {"payment_id": "pay_9", "amount": "150.00"}
    assert calls("refund") == 0 and calls("send") == 0
    approvals.approval_decide(request=request, user=acme_operator, decision="approve", expected_version=1)
    pump_until(lambda: Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED)
    assert Step.objects.get(run=run).output["did"] == [
        "lookup_customer", "draft_reply", "refund", "update_crm", "send_reply"
    ]  # fmt: skip
    # Each outside call once, though the step ran twice (before and after the approval).
    assert (calls("get_contact"), calls("refund"), calls("update_contact"), calls("send")) == (1, 1, 1, 1)
    assert SandboxContact.objects.get(tenant=sandbox_acme, number=3).stage == "support"
    tools = list(ToolCall.objects.filter(run=run).order_by("id").values_list("tool", flat=True))
    assert tools == ["llm", "crm", "llm", "llm", "llm", "payments", "llm", "crm", "llm", "messaging", "llm"]
    assert check_invariants() == []


@pytest.mark.django_db(transaction=True)
def test_a_small_refund_goes_through_without_asking_and_no_refund_is_made_unasked(
    sandbox_acme: Tenant,
) -> None:
    small = ticket(sandbox_acme, "Please refund 40, the item broke", contact_id=4)
    none = ticket(sandbox_acme, "Where is my order?", contact_id=5)
    pump_until(
        lambda: Run.objects.filter(pk__in=[small.pk, none.pk], status=RunStatus.SUCCEEDED).count() == 2
    )
    assert not ApprovalRequest.objects.exists()
    assert calls("refund") == 1 and calls("send") == 2
    assert Step.objects.get(run=none).output["refund"] is None


@pytest.mark.django_db(transaction=True)
def test_a_contact_changed_while_the_step_waited_is_updated_on_top_of_that_change_once(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    # The agent's lookup holds no lock: after the approval the step runs again, its lookup
    # answered from the record (the version it saw then). Another run changed the contact
    # meanwhile: the stage is written on top of that change, once (it used to fail the step
    # three times with the CRM's version mismatch).
    run = ticket(sandbox_acme, "I was charged twice, please refund 150")
    pump()
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    seen = SandboxContact.objects.get(tenant=sandbox_acme, number=3)
    SandboxContact.objects.filter(pk=seen.pk).update(version=F("version") + 1, email="new@example.com")
    approvals.approval_decide(request=request, user=acme_operator, decision="approve", expected_version=1)
    pump_until(lambda: Run.objects.get(pk=run.pk).status in (RunStatus.SUCCEEDED, RunStatus.FAILED))
    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED
    contact = SandboxContact.objects.get(pk=seen.pk)
    assert (contact.version, contact.stage, contact.email) == (seen.version + 2, "support", "new@example.com")
    assert calls("update_contact") == 1
    assert check_invariants() == []
