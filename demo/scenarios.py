"""Demo scenarios that need the whole system: runs and the people around them.

``contention`` (``demo_traffic --scenario contention``) makes every console page show real
content, against the live workers: a deadlock between two merges (found and broken), an
agent's refund waiting mid-step for approval, a queue of runs waiting for one contact's lock, a record
changed by "a human" while a run held it (a version conflict), a notification slower than its
step's timeout (an ambiguous effect: was it sent?), a trigger delivered twice with different
payloads, and an approval whose draft an agent edited (the earlier approval is invalidated).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.utils import timezone

from approvals import services
from approvals.models import ApprovalRequest, ApprovalStatus
from core import services as core_services
from core.models import Membership, Role, Tenant, User
from demo import sandbox
from runs.models import Run, Step, StepStatus
from runs.services import TriggerPayloadMismatch, run_start
from runwarden.client import Runwarden

Say = Callable[[str], None]


def _wait(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def contention(tenant: Tenant, say: Say, *, wait_seconds: float = 150, hold_seconds: float = 15) -> None:
    stamp = timezone.now().strftime("%H%M%S")

    def start(workflow: str, data: dict[str, Any], **kwargs: Any) -> Run:
        return run_start(tenant=tenant, workflow=workflow, input=data, actor="demo_traffic", **kwargs).run

    # Two merges of one pair in opposite directions: each holds one contact and waits for the
    # other's lock — a deadlock, found and broken (one gives way, is retried, and both finish).
    for keep, merge in ((5, 6), (6, 5)):
        start("demo.merge_contacts", {"keep": keep, "merge": merge, "read_seconds": 1.0})
    say("two merges of crm_contact:5 and :6 in opposite directions: a deadlock, broken (see /leases/)")
    # An agent's refund above the limit: its step parks mid-way for a human's approval.
    agent_run = start(
        "demo.support_agent",
        {"contact_id": 7, "ticket": "You charged me twice, please refund 150", "payment_id": "pay_7"},
    )
    say(f"an agent's refund of 150 (limit 100) waits for approval in the inbox ({agent_run.id})")
    # First what a worker must pick up soon (the review "a human" interferes with, the draft an
    # agent edits), then what only waits: the lock queue, behind one holder at a time.
    edited = start("demo.account_review", {"contact_id": 2, "review_seconds": 6})
    gated = start("demo.lead_followup", {"lead_id": 3, "contact_id": 4})
    first = start("demo.enrich_lead", {"lead_id": 1}, trigger_event_id=f"contention-{stamp}")
    try:
        start("demo.enrich_lead", {"lead_id": 2}, trigger_event_id=f"contention-{stamp}")
    except TriggerPayloadMismatch:
        say(
            f"duplicate trigger contention-{stamp} with another payload: refused, a conflict (run {first.id})"
        )
    ambiguous = start("demo.account_review", {"contact_id": 3, "review_seconds": 0, "notify_seconds": 12})
    slow_review = {"contact_id": 1, "review_seconds": hold_seconds}
    queue = [start("demo.account_review", slow_review) for _ in range(4)]
    say(
        f"lock queue: {len(queue)} reviews of crm_contact:1, {hold_seconds:g} s each "
        f"(see /leases/ and {queue[-1].id})"
    )

    review = Step.objects.get(run=edited, key="review_contact")
    if _wait(lambda: Step.objects.get(pk=review.pk).status == StepStatus.RUNNING, wait_seconds):
        time.sleep(1.0)  # it has read the contact; now a human edits it in the CRM
        sandbox.crm_edit_by_hand(tenant_id=tenant.pk, contact_id=2, name="Renamed in the CRM by a human")
        say(f"crm_contact:2 changed while {edited.id} held it: a version conflict when it writes")
    else:
        say("no worker picked up the review of crm_contact:2 (is `make run` running?)")

    if _wait(
        lambda: ApprovalRequest.objects.filter(run=gated, status=ApprovalStatus.PENDING).exists(),
        wait_seconds,
    ):
        request = ApprovalRequest.objects.select_related("artifact").get(
            run=gated, status=ApprovalStatus.PENDING
        )
        agent = _agent(tenant)
        latest = request.artifact.latest_version
        content = dict(request.artifact_version.content or {})
        content["body"] = str(content.get("body", "")) + "\n\nP.S. Rewritten by the drafting agent."
        services.artifact_edit(
            artifact=request.artifact, user=agent, expected_version=latest, content=content
        )
        say(
            f"an agent edited the draft of {gated.id}: the earlier approval is invalidated, "
            f"v{latest + 1} waits"
        )
    say(f"a notification slower than its timeout: {ambiguous.id} will wait in conflict (was it sent?)")


def _agent(tenant: Tenant) -> User:
    """The drafting agent's account: an operator of the tenant (editing a draft is an operator's
    act), so its edits are attributed; it cannot approve the version it wrote."""
    agent, _ = User.objects.get_or_create(username="drafting-agent", defaults={"email": "agent@example.com"})
    Membership.objects.get_or_create(user=agent, tenant=tenant, defaults={"role": Role.OPERATOR})
    return agent


def outside_agent(tenant: Tenant, say: Say, *, base_url: str, wait_seconds: float = 5) -> None:
    """An agent that runs outside Runwarden, speaking only HTTP through ``runwarden.client``
    to the console at ``base_url``: it takes a contact's lease, records a note through the
    ledger under it (asked twice, written once), and asks a human to approve a refund — which
    then waits in the inbox, and the agent's long-poll answers when someone decides."""
    agent, _ = User.objects.get_or_create(username="outside-agent", defaults={"email": "outside@example.com"})
    Membership.objects.get_or_create(user=agent, tenant=tenant, defaults={"role": Role.OPERATOR})
    rw = Runwarden(
        base_url,
        token=core_services.api_token_issue(user=agent, name="demo outside agent"),
        tenant=tenant.slug,
    )
    lease = rw.acquire("crm_contact:8", holder="outside-agent", ttl=30)
    stamp = timezone.now().strftime("%H%M%S")
    note = {"note": "called the customer"}
    for _ in range(2):  # a retry of the agent's own: answered from the ledger
        rw.effect(f"note-{stamp}", "crm.note", lambda: note, request={"contact": 8}, lease=lease)
    rw.release(lease)
    say(f"an outside agent held crm_contact:8 (token {lease.token}) and wrote one note through the ledger")
    decision = rw.ask_approval("payments.refund", {"payment_id": "pay_8", "amount": "180.00"})
    answer = rw.decision(decision, wait=wait_seconds)
    say(f"an outside agent's refund of 180 waits in the inbox ({decision}): {answer['status']}")
