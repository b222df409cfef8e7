"""A human's decision on an action an agent outside Runwarden proposes: the agent asks
(``POST /api/v1/outside/approvals``), a person decides in the inbox like any approval, and the
agent long-polls the answer (``GET …?wait=30``) or hears it on the tenant's webhook
(``approval_decided``). The decision is a run of ``runwarden.outside_approval``
(approvals/workflows.py), so it has every rule of an approval here."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any, Literal

from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Field, Query, Router, Schema, Status

from approvals import selectors
from approvals.workflows import DEFAULT_ROLES, OUTSIDE_APPROVAL, Role
from core.api import ApiError, InputSchema, request_user
from core.selectors import scope_to_user
from runs import services as run_services
from runs.api import over_quota, tenant_to_act_in
from runs.definitions import InvalidInput
from runs.models import Run

router = Router(tags=["outside agents"])

LONG_POLL_MAX_SECONDS = 60
LONG_POLL_EVERY_SECONDS = 0.25


class OutsideApprovalIn(InputSchema):
    tenant: str = ""
    kind: str = Field(min_length=1, max_length=50, description="what the action is, e.g. payments.refund")
    action: dict[str, Any] = Field(description="what the agent proposes to do; a human may edit it")
    agent: str = Field(default="", max_length=200)
    required: int = Field(default=1, ge=1, le=10, description="approvals from distinct people")
    roles: list[Role] = Field(default_factory=lambda: list(DEFAULT_ROLES), min_length=1)
    timeout_seconds: float | None = Field(default=None, gt=0, le=30 * 24 * 3600)
    on_timeout: Literal["reject", "escalate"] = "reject"
    idempotency_key: str = Field(default="", max_length=200, description="the same key asks once")


class OutsideDecisionOut(Schema):
    id: str = Field(description="the decision's id (a run of runwarden.outside_approval)")
    status: str = Field(description="pending | approved | rejected | expired | withdrawn")
    approval_id: int | None
    action: dict[str, Any] | None = Field(
        description="the action as approved: perform this, not your proposal"
    )
    reason: str
    decided_by: str | None
    decided_at: datetime | None


class WaitQuery(Schema):
    wait: float = Field(
        default=0, ge=0, le=LONG_POLL_MAX_SECONDS, description="seconds to wait for a decision"
    )


@router.post("/outside/approvals", response={200: OutsideDecisionOut, 201: OutsideDecisionOut})
def outside_approval_ask(request: HttpRequest, payload: OutsideApprovalIn) -> Status[dict[str, Any]]:
    """Ask a human to decide on a proposed action. 201 (200 when ``idempotency_key`` asked
    already): its id; poll it, or wait for the ``approval_decided`` webhook."""
    tenant = tenant_to_act_in(request, payload.tenant)
    asked = payload.dict(exclude={"tenant", "idempotency_key"})
    asked["agent"] = asked["agent"] or request_user(request).get_username()
    try:
        started = run_services.run_start(
            tenant=tenant,
            workflow=OUTSIDE_APPROVAL,
            input=asked,
            actor=request_user(request).get_username(),
            trigger_event_id=payload.idempotency_key,
        )
    except InvalidInput as exc:
        raise ApiError(
            422, "invalid_input", "The proposed action does not fit.", {"fields": exc.fields}
        ) from None
    except run_services.TriggerPayloadMismatch as exc:
        raise ApiError(409, "idempotency_key_reused", str(exc), {"id": exc.run_id}) from None
    except run_services.QuotaExceeded as exc:
        raise over_quota(exc) from None
    return Status(201 if started.created else 200, selectors.outside_decision(started.run))


# A web process answers requests on a few threads (RUNWARDEN_WEB_THREADS): at most this many
# of them wait at once; a long-poll beyond that answers at once (the client asks again).
LONG_POLLS_AT_ONCE = 2
_long_polls = threading.BoundedSemaphore(LONG_POLLS_AT_ONCE)


@router.get("/outside/approvals/{decision_id}", response=OutsideDecisionOut)
def outside_approval_wait(
    request: HttpRequest, response: HttpResponse, decision_id: str, query: Query[WaitQuery]
) -> dict[str, Any]:
    """Where the decision stands; with ``wait``, held open until it is decided or ``wait``
    seconds pass (then ``pending``). When the web process already holds its share of waits,
    it answers at once with ``Retry-After: 1``."""
    runs = scope_to_user(Run.objects.filter(workflow=OUTSIDE_APPROVAL), request_user(request))
    run = get_object_or_404(runs, pk=decision_id)
    answer = selectors.outside_decision(run)
    if answer["status"] != "pending" or not query.wait:
        return answer
    if not _long_polls.acquire(blocking=False):
        response["Retry-After"] = "1"
        return answer
    try:
        deadline = time.monotonic() + query.wait
        while answer["status"] == "pending" and time.monotonic() < deadline:
            close_old_connections()
            time.sleep(LONG_POLL_EVERY_SECONDS)
            answer = selectors.outside_decision(Run.objects.get(pk=run.pk))
        return answer
    finally:
        _long_polls.release()
