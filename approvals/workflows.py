"""The approvals app's own workflow: a human's decision on an action an agent outside
Runwarden proposes over the API (``approvals/outside_api.py``). One step asks, through the
same governed call a step inside Runwarden makes (``ctx.tool(..., approval=...)``), so the
decision has every rule of an approval here: compare-and-set, quorum, roles, edits that
invalidate it, a timeout's fallback, the inbox and the tenant's webhook."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from runs.context import StepContext
from runs.definitions import ApprovalPolicy, WorkflowInput, workflow
from runs.interrupts import Rejected

OUTSIDE_APPROVAL = "runwarden.outside_approval"
ACTION_CALL = "action"  # the call's key in the step: its artifact's call_key
Role = Literal["operator", "reviewer", "admin"]
DEFAULT_ROLES: tuple[Role, ...] = ("operator",)


class OutsideActionInput(WorkflowInput):
    kind: str = Field(min_length=1, max_length=50, pattern=r"^[\w.:-]+$", description="e.g. payments.refund")
    action: dict[str, Any] = Field(description="what the agent proposes to do: a human may edit it")
    agent: str = Field(default="", max_length=200, description="who proposes it")
    required: int = Field(default=1, ge=1, le=10)
    roles: list[Role] = Field(default_factory=lambda: list(DEFAULT_ROLES), min_length=1)
    timeout_seconds: float | None = Field(default=None, gt=0, le=30 * 24 * 3600)
    on_timeout: Literal["reject", "escalate"] = "reject"


outside_approval = workflow(
    OUTSIDE_APPROVAL,
    description="A human decides on an action an agent outside Runwarden proposes",
    input=OutsideActionInput,
)


@outside_approval.step(lane="read")
def decide(ctx: StepContext) -> dict[str, Any]:
    asked = ctx.input
    policy = ApprovalPolicy(
        required=int(asked.get("required", 1)),
        roles=tuple(asked.get("roles") or ("operator",)),
        timeout_seconds=asked.get("timeout_seconds"),
        on_timeout=str(asked.get("on_timeout", "reject")),
    )
    try:
        approved = ctx.tool(
            asked["kind"], lambda request: request, request=asked["action"], approval=policy, key=ACTION_CALL
        )
    except Rejected as refused:
        return {"decision": "rejected", "reason": refused.reason}
    return {"decision": "approved", "action": approved}
