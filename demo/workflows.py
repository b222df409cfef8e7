"""The demo workflows, on the in-repo sandbox connectors (demo.sandbox).

They are what ``make run``, ``demo_traffic``, the README and the tests use, and they are
written the way an integrator writes theirs: plain functions, one per step, effects through
``ctx.effect`` so a retry never acts twice.
"""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from demo import sandbox
from runs.context import AsyncStepContext, StepContext
from runs.definitions import ApprovalPolicy, SessionPolicy, WorkflowInput, workflow
from runs.gates import EntityChanged
from runs.interrupts import Rejected


def _not_a_boolean(value: Any) -> Any:
    # pydantic would read true as 1: a client bug that must not pay invoice 1.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_allowed", "Input should be a number, not a boolean")
    return value


def _email(value: str) -> str:
    try:
        validate_email(value)  # what the sandbox's EmailField accepts
    except DjangoValidationError:
        raise PydanticCustomError("email", "Enter a valid email address") from None
    return value


# A sandbox record number (a PositiveIntegerField there).
RecordId = Annotated[int, BeforeValidator(_not_a_boolean), Field(ge=1, le=2_147_483_647)]

# Money as the sandbox stores it (DecimalField(max_digits=12, decimal_places=2)): "120" or 120
# is accepted and stored as "120.00".
Amount = Annotated[
    Decimal,
    BeforeValidator(_not_a_boolean),
    Field(gt=0, max_digits=12, decimal_places=2),
    AfterValidator(lambda amount: amount.quantize(Decimal("0.01"))),
]


def send_message_once(ctx: StepContext, *, to: str, message: dict[str, str]) -> str:
    """Send ``message`` ({"subject", "body"}) through the run's messaging connection as one
    ledger effect (a retry gets the recorded result, never a second message): its id."""
    sent = ctx.effect(
        "messaging.send",
        lambda: sandbox.messaging_send(
            tenant_id=ctx.tenant_id,
            to=to,
            subject=message["subject"],
            body=message["body"],
            key=f"{ctx.run_id}:{ctx.step_key}",
            connection=ctx.connection("messaging"),
        ),
        request={"to": to, **message},
        external_ref=lambda r: r["message_id"],
    )
    return str(sent.get("message_id") or sent["external_ref"])


# demo.enrich_lead: read and draft steps only, no approval. Input: {"lead_id": 7}


class EnrichLeadInput(WorkflowInput):
    lead_id: RecordId


enrich_lead = workflow(
    "demo.enrich_lead",
    description="Look up a lead, score it and draft a note",
    input=EnrichLeadInput,
    connections=["crm"],
)


@enrich_lead.step(lane="read", tool="crm")
def fetch_lead(ctx: StepContext) -> dict[str, Any]:
    return {
        "lead": sandbox.lead_get(
            tenant_id=ctx.tenant_id, lead_id=int(ctx.input["lead_id"]), connection=ctx.connection("crm")
        )
    }


@enrich_lead.step(lane="read")
def summarize(ctx: StepContext) -> dict[str, Any]:
    lead = ctx.outputs["fetch_lead"]["lead"]
    tier = "hot" if lead["score"] >= 60 else "warm" if lead["score"] >= 30 else "cold"
    return {"tier": tier, "summary": f"{lead['name']} at {lead['company']} scores {lead['score']} ({tier})"}


@enrich_lead.step(lane="draft")
def draft_note(ctx: StepContext) -> dict[str, Any]:
    return {"note": f"Follow up: {ctx.outputs['summarize']['summary']}."}


# demo.crm_update: one CRM contact, under its entity lock.
# Input: {"contact_id": 1, "changes": {"stage": "won"}} (name and email may change too)


class ContactChanges(WorkflowInput):
    # The fields sandbox.crm_update_contact writes, within their columns' limits.
    stage: str = Field(min_length=1, max_length=50)
    name: str | None = Field(default=None, min_length=1, max_length=200, exclude_if=lambda v: v is None)
    email: Annotated[str, AfterValidator(_email)] | None = Field(
        default=None, max_length=254, exclude_if=lambda v: v is None
    )


class CrmUpdateInput(WorkflowInput):
    contact_id: RecordId
    changes: ContactChanges


crm_update = workflow(
    "demo.crm_update",
    description="Update one CRM contact under its lock",
    input=CrmUpdateInput,
    connections=["crm"],  # bound at start: the tenant's CRM account in the run's environment
)


def _write_contact(
    ctx: StepContext, contact_id: int, changes: dict[str, Any], *, expected_version: int
) -> dict[str, Any]:
    """Write ``changes`` to a CRM contact through the ledger, if it is still at the version the
    step read. Someone outside Runwarden changed it between the read and the write: a reviewer
    decides whether the change still applies (EntityChanged puts the step in conflict)."""
    try:
        result: dict[str, Any] = ctx.effect(
            "crm.update_contact",
            lambda: sandbox.crm_update_contact(
                tenant_id=ctx.tenant_id,
                contact_id=contact_id,
                changes=changes,
                expected_version=expected_version,
                key=f"{ctx.run_id}:{ctx.step_key}",
                connection=ctx.connection("crm"),
            ),
            request={"contact_id": contact_id, "changes": changes},
            external_ref=lambda r: f"contact:{r['id']}@v{r['version']}",
        )
    except sandbox.SandboxVersionMismatch as changed:
        raise EntityChanged(
            f"crm_contact:{contact_id}", expected=changed.expected, actual=changed.actual, proposed=changes
        ) from None
    return result


@crm_update.step(lane="external", tool="crm", locks=["crm_contact:{contact_id}"])
def apply_changes(ctx: StepContext) -> dict[str, Any]:
    contact_id = int(ctx.input["contact_id"])
    changes = dict(ctx.input["changes"])
    contact = sandbox.crm_get_contact(
        tenant_id=ctx.tenant_id, contact_id=contact_id, connection=ctx.connection("crm")
    )
    result = _write_contact(ctx, contact_id, changes, expected_version=contact["version"])
    # A reviewer who confirmed an ambiguous effect records only its reference (``external_ref``).
    return {"contact_id": contact_id, "version": result.get("version"), "stage": result.get("stage")}


# demo.account_review: a slow review of one contact under its lock, then a notification.
# Input: {"contact_id": 1, "review_seconds": 8, "notify_seconds": 0}. The review reads the
# contact, takes its time (holding crm_contact:<id>: other runs of that contact queue behind
# it), then writes what it read; if the contact changed meanwhile, that is a conflict. A
# notification slower than its step's 5 s timeout is ambiguous (was it sent?): a conflict.
# `demo_traffic --scenario contention` uses it to show lock waits and conflicts.


class AccountReviewInput(WorkflowInput):
    contact_id: RecordId
    review_seconds: float = Field(default=8, ge=0, le=60, allow_inf_nan=False)
    notify_seconds: float = Field(default=0, ge=0, le=60, allow_inf_nan=False)


account_review = workflow(
    "demo.account_review",
    description="Review one contact slowly under its lock, then notify the owner",
    input=AccountReviewInput,
    connections=["crm", "messaging"],
)


@account_review.step(lane="external", tool="crm", locks=["crm_contact:{contact_id}"], timeout_seconds=90)
def review_contact(ctx: StepContext) -> dict[str, Any]:
    contact_id = int(ctx.input["contact_id"])
    contact = sandbox.crm_get_contact(
        tenant_id=ctx.tenant_id, contact_id=contact_id, connection=ctx.connection("crm")
    )
    deadline = time.monotonic() + float(ctx.input.get("review_seconds", 8))
    while time.monotonic() < deadline:
        time.sleep(0.2)
        ctx.heartbeat()
    result = _write_contact(ctx, contact_id, {"stage": "reviewed"}, expected_version=contact["version"])
    return {"contact_id": contact_id, "version": result.get("version")}


@account_review.step(lane="external", tool="messaging", timeout_seconds=5, max_attempts=2)
def notify_owner(ctx: StepContext) -> dict[str, Any]:
    def send() -> dict[str, Any]:
        time.sleep(float(ctx.input.get("notify_seconds", 0)))  # a slow provider
        return sandbox.messaging_send(
            tenant_id=ctx.tenant_id,
            to="owner@example.com",
            subject=f"Contact {ctx.input['contact_id']} reviewed",
            body=ctx.run_id,
            key=f"{ctx.run_id}:notify_owner",
            connection=ctx.connection("messaging"),
        )

    sent = ctx.effect("messaging.send", send, request={"run": ctx.run_id})
    return {"message_id": sent.get("message_id") or sent.get("external_ref")}


# demo.lead_followup: enrich -> draft a message (the artifact) -> send it after approval.
# Input: {"lead_id": 7, "contact_id": 1}


class LeadFollowupInput(WorkflowInput):
    lead_id: RecordId
    contact_id: RecordId


lead_followup = workflow(
    "demo.lead_followup",
    description="Draft a follow-up and send it once approved",
    input=LeadFollowupInput,
    connections=["crm", "messaging"],
)


@lead_followup.step(lane="read", tool="crm")
def enrich(ctx: StepContext) -> dict[str, Any]:
    return {
        "lead": sandbox.lead_get(
            tenant_id=ctx.tenant_id, lead_id=int(ctx.input["lead_id"]), connection=ctx.connection("crm")
        )
    }


@lead_followup.step(lane="draft")
async def draft_message(ctx: AsyncStepContext) -> dict[str, Any]:
    lead = ctx.outputs["enrich"]["lead"]
    body = await sandbox.model_draft_followup(name=lead["name"])  # a model call, awaited
    return {"subject": f"Next steps for {lead['company']}", "body": body}


@lead_followup.step(
    lane="external",
    tool="messaging",
    locks=["crm_contact:{contact_id}"],
    approval=ApprovalPolicy(required=1, roles=("operator",), redraft_step="draft_message"),
)
def send_message(ctx: StepContext) -> dict[str, Any]:
    message = ctx.approved_content  # exactly the version the operator approved
    contact = sandbox.crm_get_contact(
        tenant_id=ctx.tenant_id, contact_id=int(ctx.input["contact_id"]), connection=ctx.connection("crm")
    )
    return {
        "message_id": send_message_once(ctx, to=contact["email"], message=message),
        "to": contact["email"],
    }


# demo.invoice_payment: high-risk lane, approval required, serialised per invoice.
# Input: {"invoice_id": 3, "amount": "120.00"}


class InvoicePaymentInput(WorkflowInput):
    invoice_id: RecordId
    amount: Amount


invoice_payment = workflow(
    "demo.invoice_payment",
    description="Pay an invoice once approved",
    input=InvoicePaymentInput,
    connections=["payments"],
)


@invoice_payment.step(lane="draft")
def prepare_payment(ctx: StepContext) -> dict[str, Any]:
    try:
        amount = Decimal(str(ctx.input["amount"]))
    except (InvalidOperation, KeyError):
        raise ValueError("amount must be a decimal string such as '120.00'") from None
    if amount <= 0:
        raise ValueError("amount must be positive")
    invoice_id = int(ctx.input["invoice_id"])
    return {"invoice_id": invoice_id, "amount": str(amount.quantize(Decimal("0.01")))}


@invoice_payment.step(
    lane="high_risk",
    tool="payments",
    locks=["invoice:{invoice_id}"],
    approval=ApprovalPolicy(required=1, roles=("operator",)),
    max_attempts=1,
)
def charge(ctx: StepContext) -> dict[str, Any]:
    payment = ctx.approved_content
    paid = ctx.effect(
        "payments.charge",
        lambda: sandbox.payments_charge(
            tenant_id=ctx.tenant_id,
            invoice_id=int(payment["invoice_id"]),
            amount=Decimal(payment["amount"]),
            key=f"{ctx.run_id}:charge",
            connection=ctx.connection("payments"),
        ),
        request=payment,
        external_ref=lambda r: r["payment_id"],
    )
    return {"payment_id": paid.get("payment_id") or paid["external_ref"], "amount": payment["amount"]}


# demo.chat_reply: one conversation's messages are answered one at a time, in order.
# Start with a session: {"workflow": "demo.chat_reply", "session_key": "conv-42",
#                        "input": {"contact_id": 1, "message": "Can we move the call?"}}


class ChatReplyInput(WorkflowInput):
    contact_id: RecordId
    message: str = Field(min_length=1, max_length=2000)


chat_reply = workflow(
    "demo.chat_reply",
    description="Answer one message of a conversation; a conversation's messages never interleave",
    input=ChatReplyInput,
    session=SessionPolicy(max_concurrent=1, queue_timeout_seconds=600, overflow="queue"),
    connections=["crm", "messaging"],
)


@chat_reply.step(lane="read", tool="crm")
def load_contact(ctx: StepContext) -> dict[str, Any]:
    return {
        "contact": sandbox.crm_get_contact(
            tenant_id=ctx.tenant_id, contact_id=int(ctx.input["contact_id"]), connection=ctx.connection("crm")
        )
    }


@chat_reply.step(lane="draft")
def draft_reply(ctx: StepContext) -> dict[str, Any]:
    contact = ctx.outputs["load_contact"]["contact"]
    quoted = str(ctx.input["message"])[:80]
    return {
        "subject": "Re: your message",
        "body": f"Hi {contact['name']},\n\nabout \u201c{quoted}\u201d: on it.\n",
    }


@chat_reply.step(lane="external", tool="messaging")
def send_reply(ctx: StepContext) -> dict[str, Any]:
    contact = ctx.outputs["load_contact"]["contact"]
    reply = ctx.outputs["draft_reply"]
    return {"message_id": send_message_once(ctx, to=contact["email"], message=reply)}


# demo.order_checkout: reserve stock, charge, confirm. A failed confirmation (or a cancel)
# compensates what committed, newest first: the charge is refunded, then the stock released.
# Input: {"invoice_id": 3, "amount": "49.00", "sku": "SKU-1", "quantity": 1}
# ("simulate_confirm_failure": true makes the confirmation service refuse the order).


class OrderCheckoutInput(WorkflowInput):
    invoice_id: RecordId
    amount: Amount
    sku: str = Field(min_length=1, max_length=40)
    quantity: int = Field(default=1, ge=1, le=1000)
    contact_id: RecordId = 1
    simulate_confirm_failure: bool = False


order_checkout = workflow(
    "demo.order_checkout",
    description="Reserve, charge, confirm; a failure refunds the charge and releases the stock",
    input=OrderCheckoutInput,
    connections=["inventory", "payments", "crm", "messaging"],
)


def release_stock(ctx: StepContext, results: dict[str, Any]) -> dict[str, Any]:
    reservation = results["inventory.reserve"]
    released = ctx.effect(
        "inventory.release",
        lambda: sandbox.inventory_release(
            tenant_id=ctx.tenant_id,
            reservation_id=reservation["reservation_id"],
            key=f"{ctx.run_id}:release",
            connection=ctx.connection("inventory"),
        ),
        request={"reservation_id": reservation["reservation_id"]},
    )
    return {"released": released["released"]}


@order_checkout.step(lane="external", tool="inventory", compensate=release_stock)
def reserve_stock(ctx: StepContext) -> dict[str, Any]:
    sku, quantity = str(ctx.input["sku"]), int(ctx.input["quantity"])
    reserved = ctx.effect(
        "inventory.reserve",
        lambda: sandbox.inventory_reserve(
            tenant_id=ctx.tenant_id,
            sku=sku,
            quantity=quantity,
            key=f"{ctx.run_id}:reserve",
            connection=ctx.connection("inventory"),
        ),
        request={"sku": sku, "quantity": quantity},
    )
    return {"reservation_id": reserved["reservation_id"]}


def refund_charge(ctx: StepContext, results: dict[str, Any]) -> dict[str, Any]:
    charge = results["payments.charge"]
    refunded = ctx.effect(
        "payments.refund",
        lambda: sandbox.payments_refund(
            tenant_id=ctx.tenant_id,
            payment_id=charge["payment_id"],
            amount=charge["amount"],
            key=f"{ctx.run_id}:refund",
            connection=ctx.connection("payments"),
        ),
        request={"payment_id": charge["payment_id"], "amount": charge["amount"]},
        external_ref=lambda r: r["refund_id"],
    )
    return {"refund_id": refunded["refund_id"]}


@order_checkout.step(
    lane="high_risk",
    tool="payments",
    locks=["invoice:{invoice_id}"],
    max_attempts=1,
    compensate=refund_charge,
)
def charge_card(ctx: StepContext) -> dict[str, Any]:
    amount = Decimal(str(ctx.input["amount"]))
    paid = ctx.effect(
        "payments.charge",
        lambda: sandbox.payments_charge(
            tenant_id=ctx.tenant_id,
            invoice_id=int(ctx.input["invoice_id"]),
            amount=amount,
            key=f"{ctx.run_id}:charge",
            connection=ctx.connection("payments"),
        ),
        request={"invoice_id": ctx.input["invoice_id"], "amount": str(amount)},
        external_ref=lambda r: r["payment_id"],
    )
    return {"payment_id": paid["payment_id"]}


@order_checkout.step(lane="external", tool="messaging", max_attempts=1)
def confirm_order(ctx: StepContext) -> dict[str, Any]:
    if ctx.input.get("simulate_confirm_failure"):
        raise RuntimeError("the order service refused the confirmation")
    contact = sandbox.crm_get_contact(
        tenant_id=ctx.tenant_id, contact_id=int(ctx.input["contact_id"]), connection=ctx.connection("crm")
    )
    confirmation = {
        "subject": "Your order is confirmed",
        "body": f"Order for {ctx.input['quantity']} × {ctx.input['sku']} confirmed.",
    }
    return {"message_id": send_message_once(ctx, to=str(contact["email"]), message=confirmation)}


# demo.support_agent: an agent loop in one step. A planner decides each next tool call at
# runtime (here a rules table stands in for the model, behind the call path a model client
# would take); every call is governed (ctx.tool): counted under its tool's cap, recorded in the
# ledger (a re-run of the step is answered from there), the CRM write under the contact's lock,
# and a refund above REFUND_LIMIT approved by a human mid-step. Input: {"contact_id": 1,
# "ticket": "The invoice was wrong, please refund 150", "payment_id": "pay_123"}

REFUND_LIMIT = Decimal("100")


class SupportTicketInput(WorkflowInput):
    contact_id: RecordId
    ticket: str = Field(min_length=1, max_length=2000)
    payment_id: str = Field(default="pay_demo", min_length=1, max_length=60)


class ScriptedPlanner:
    """Stands in for a model: given the ticket and what the agent has observed so far, the
    next tool to call and its arguments, from a rules table. Deterministic, so the demo runs
    without a model download; a real client (``AsyncOpenAI``, ...) takes the same place."""

    def plan(self, request: dict[str, Any]) -> dict[str, Any]:
        seen, ticket = request["observed"], request["ticket"].lower()
        refund = _refund_amount(ticket)
        for tool, wanted in (
            ("lookup_customer", True),
            ("draft_reply", True),
            ("refund", refund is not None),
            ("update_crm", True),
            ("send_reply", True),
        ):
            if wanted and tool not in seen:
                return {"tool": tool, "amount": str(refund) if tool == "refund" else None}
        return {"tool": "done"}

    def draft(self, request: dict[str, Any]) -> dict[str, str]:
        name = request["customer"]["name"]
        if request.get("refund"):
            body = f"Hello {name}, we are refunding {request['refund']} to you. Sorry for the trouble."
        else:
            body = f"Hello {name}, thank you for writing; we are on it."
        return {"subject": "About your ticket", "body": body}


PLANNER = ScriptedPlanner()


def _refund_amount(ticket: str) -> Decimal | None:
    if "refund" not in ticket:
        return None
    numbers = [word.strip(".,$€") for word in ticket.split()]
    for word in numbers:
        try:
            return Decimal(word).quantize(Decimal("0.01"))
        except InvalidOperation:
            continue
    return Decimal("10.00")


support_agent = workflow(
    "demo.support_agent",
    description="An agent answers a ticket: its tool calls decided at runtime, each one governed",
    input=SupportTicketInput,
    connections=["crm", "messaging", "payments"],
)


@support_agent.step(lane="draft", timeout_seconds=120)
def answer_ticket(ctx: StepContext) -> dict[str, Any]:
    contact_id, ticket = int(ctx.input["contact_id"]), ctx.input["ticket"]
    observed: dict[str, Any] = {}
    while True:
        # Each planning call is recorded too: a re-run of the step sees exactly what it saw.
        decision = ctx.tool("llm", PLANNER.plan, request={"ticket": ticket, "observed": sorted(observed)})
        tool = decision["tool"]
        if tool == "done":
            return {"contact_id": contact_id, "did": list(observed), "refund": observed.get("refund")}
        if tool == "lookup_customer":
            observed[tool] = ctx.tool(
                "crm",
                lambda req: sandbox.crm_get_contact(
                    tenant_id=ctx.tenant_id, contact_id=req["contact_id"], connection=ctx.connection("crm")
                ),
                request={"contact_id": contact_id},
            )
        elif tool == "draft_reply":
            observed[tool] = ctx.tool(
                "llm",
                PLANNER.draft,
                request={"customer": observed["lookup_customer"], "refund": decision["amount"]},
            )
        elif tool == "refund":
            observed[tool] = _refund(ctx, decision["amount"])
        elif tool == "update_crm":
            observed[tool] = _move_to_support(ctx, contact_id)
        elif tool == "send_reply":
            message = observed["draft_reply"]
            observed[tool] = ctx.tool(
                "messaging",
                lambda req: sandbox.messaging_send(
                    tenant_id=ctx.tenant_id,
                    key=f"{ctx.run_id}:reply",
                    connection=ctx.connection("messaging"),
                    **req,
                ),
                request={"to": observed["lookup_customer"]["email"], **message},
                external_ref=lambda sent: sent["message_id"],
            )


def _move_to_support(ctx: StepContext, contact_id: int) -> dict[str, Any]:
    """Move the contact to the support stage, whatever version it is at by then: the agent's
    lookup held no lock and is answered from its record when the step runs again (after an
    approval), so another run may have written the contact since; the stage is all this
    changes, under the contact's lock (the call's ``locks``)."""
    return ctx.tool(
        "crm",
        lambda req: sandbox.crm_update_contact(
            tenant_id=ctx.tenant_id,
            contact_id=req["contact_id"],
            changes=req["changes"],
            expected_version=None,
            key=f"{ctx.run_id}:update",
            connection=ctx.connection("crm"),
        ),
        request={"contact_id": contact_id, "changes": {"stage": "support"}},
        locks=[f"crm_contact:{contact_id}"],
    )


def _refund(ctx: StepContext, amount: str) -> dict[str, Any]:
    """A refund above REFUND_LIMIT waits for a human (the step parks; approved, it goes on with
    the approved, possibly edited, amount); a rejected one is answered in the reply instead."""
    try:
        return ctx.tool(
            "payments",
            lambda req: sandbox.payments_refund(
                tenant_id=ctx.tenant_id,
                payment_id=req["payment_id"],
                amount=req["amount"],
                key=f"{ctx.run_id}:refund",
                connection=ctx.connection("payments"),
            ),
            request={"payment_id": ctx.input["payment_id"], "amount": amount},
            approval=lambda req: Decimal(req["amount"]) > REFUND_LIMIT,
            external_ref=lambda refund: refund["refund_id"],
        )
    except Rejected as refused:
        return {"refused": refused.reason}


# demo.merge_contacts: merges one CRM contact into another, holding the kept contact's lock
# (declared) and then taking the merged one's mid-step. Two merges of the same pair in opposite
# directions wait for each other: a deadlock, found and broken (one gives way and is retried).
# Input: {"keep": 5, "merge": 6}


class MergeContactsInput(WorkflowInput):
    keep: RecordId
    merge: RecordId
    read_seconds: float = Field(default=1.0, ge=0, le=30, allow_inf_nan=False)


merge_contacts = workflow(
    "demo.merge_contacts",
    description="Merge a contact into another, under both contacts' locks",
    input=MergeContactsInput,
    connections=["crm"],
)


# On the draft lane (many slots a worker process): the two merges run at once.
@merge_contacts.step(lane="draft", tool="crm", locks=["crm_contact:{keep}"])
def merge(ctx: StepContext) -> dict[str, Any]:
    keep, merged = int(ctx.input["keep"]), int(ctx.input["merge"])
    kept = sandbox.crm_get_contact(tenant_id=ctx.tenant_id, contact_id=keep, connection=ctx.connection("crm"))
    time.sleep(float(ctx.input["read_seconds"]))  # reading the kept contact's history
    # Not long: where the draft lane has one slot, the other merge, admitted with its contact's
    # lock, waits for this slot: no cycle of lock waits to find, so this wait times out and the
    # merge is retried after the other.
    ctx.lock(f"crm_contact:{merged}", wait_timeout=10)
    gone = sandbox.crm_get_contact(
        tenant_id=ctx.tenant_id, contact_id=merged, connection=ctx.connection("crm")
    )
    return {"kept": kept["id"], "merged": gone["id"], "name": kept["name"]}
