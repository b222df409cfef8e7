"""Runs API (v1): start, list, read and cancel runs; live leases."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pydantic
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Field, Query, Router, Schema, Status

from core.api import ApiError, InputSchema, request_environment, request_user
from core.models import Membership, Role, User
from core.selectors import ROLE_GRANTS
from runs import access, selectors, services
from runs.definitions import InvalidInput, UnknownWorkflow, pydantic_fields
from runs.models import Run, RunStatus
from runs.sessions import SessionOverflow

router = Router(tags=["runs"])


class RunIn(InputSchema):
    workflow: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str = Field(default="", max_length=200)
    trigger_event_id: str = Field(default="", max_length=200)
    tenant: str = Field(default="", description="tenant slug; optional when you belong to one tenant")
    session_key: str = Field(
        default="",
        max_length=200,
        description="runs of one session (a conversation, a thread, a user) run one at a time, in order",
    )
    environment: str = Field(
        default="",
        max_length=64,
        description="the environment to run in; else the one the API token was issued for",
    )
    connections: dict[str, str] = Field(
        default_factory=dict,
        description="connection names by provider; else the environment's default for each",
    )
    sequence: int | None = Field(
        default=None,
        ge=1,
        lt=2**62,
        description="order within the session, counting from 1 (else start order)",
    )


class RunFilters(InputSchema):
    status: str = ""
    workflow: str = ""
    correlation_id: str = ""
    tenant: str = ""
    session_key: str = Field(default="", max_length=200, description="a session's runs")
    cursor: str = ""
    limit: int = Field(default=50, ge=1, le=200)


class StepOut(Schema):
    key: str
    position: int
    lane: str
    tool: str
    status: str
    attempt: int
    lock_keys: list[str]
    output: Any = None
    error: str
    started_at: datetime | None
    finished_at: datetime | None


class EffectOut(Schema):
    kind: str
    status: str
    idempotency_key: str
    external_ref: str
    attempts: int
    proposed_at: datetime
    committed_at: datetime | None
    context: dict[str, Any] = Field(
        description="the run's contract when proposed: correlation id, actor, environment, session, "
        "workflow version, connections, attempt"
    )


class ToolCallOut(Schema):
    step: str
    key: str = Field(description="the call's key in its step: its place (1, 2, ...) or the key the body gave")
    tool: str
    status: str = Field(description="waiting | awaiting_approval | running | succeeded | failed | rejected")
    request: dict[str, Any]
    lock_keys: list[str]
    lock_wait_ms: float | None
    cap_wait_ms: float | None
    approval_id: int | None
    idempotency_key: str = Field(description="its record in the side-effect ledger; empty until it ran")
    external_ref: str
    error: str
    started_at: datetime | None
    finished_at: datetime | None


class LeaseOut(Schema):
    key: str
    tenant: str
    holder: str
    token: int
    run_id: str | None
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime


class SessionOut(Schema):
    key: str
    sequence: int | None
    state: str = Field(description="waiting, active, done or dropped (left the queue without running)")
    place: int | None = Field(description="place in the session's queue while waiting (1: next)")


class RunSummaryOut(Schema):
    id: str
    tenant: str
    workflow: str
    workflow_version: str
    status: str
    actor: str
    correlation_id: str
    trigger_event_id: str
    trace_id: str = Field(
        description="the run's OpenTelemetry trace (32 hex digits); empty when tracing was off at its start"
    )
    environment: str
    connections: dict[str, str] = Field(description="the connections bound at start, by provider")
    session: SessionOut | None
    replay_of: str | None
    retries: int
    compensation: str = Field(
        description="after a failure or cancel: running, done or failed (a compensation waits for a "
        "reviewer); empty when nothing was compensated"
    )
    input: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunOut(RunSummaryOut):
    steps: list[StepOut]
    effects: list[EffectOut]
    tool_calls: list[ToolCallOut]
    leases: list[LeaseOut]


class RunPage(Schema):
    items: list[RunSummaryOut]
    next_cursor: str | None


def over_quota(exc: services.QuotaExceeded) -> ApiError:
    return ApiError(
        429,
        "queue_depth_exceeded",
        str(exc),
        {"depth": exc.depth, "limit": exc.limit},
        headers={"Retry-After": str(exc.retry_after)},
    )


def tenant_to_act_in(request: HttpRequest, slug: str) -> Any:
    user = request_user(request)
    if slug:
        return access.access_start_runs(user, slug)
    memberships = [
        m
        for m in Membership.objects.filter(user=user).select_related("tenant")
        if Role.OPERATOR in ROLE_GRANTS[m.role]
    ]
    if len(memberships) != 1:
        raise ApiError(
            400, "tenant_required", "You can start runs in several tenants (or none): name one in 'tenant'."
        )
    return memberships[0].tenant


@router.post("/runs", response={200: RunOut, 201: RunOut})
def run_start(request: HttpRequest, payload: RunIn, response: HttpResponse) -> Status[dict[str, Any]]:
    header_key = request.headers.get("Idempotency-Key", "")
    if "\x00" in header_key:
        raise ApiError(400, "invalid_request", "Idempotency-Key may not contain NUL characters.")
    if len(header_key) > 200:
        raise ApiError(400, "invalid_request", "Idempotency-Key is longer than 200 characters.")
    if header_key and payload.trigger_event_id and header_key != payload.trigger_event_id:
        raise ApiError(
            400, "invalid_request", "Idempotency-Key and trigger_event_id differ; send one of them."
        )
    tenant = tenant_to_act_in(request, payload.tenant)
    try:
        start = services.run_start(
            tenant=tenant,
            workflow=payload.workflow,
            input=payload.input,
            actor=request_user(request).get_username(),
            correlation_id=payload.correlation_id,
            trigger_event_id=header_key or payload.trigger_event_id,
            session_key=payload.session_key,
            sequence=payload.sequence,
            environment=request_environment(request, payload.environment),
            connections=payload.connections,
        )
    except UnknownWorkflow as exc:
        raise ApiError(400, "unknown_workflow", str(exc)) from None
    except InvalidInput as exc:
        raise ApiError(
            422,
            "invalid_input",
            f"The run request does not fit workflow {payload.workflow}.",
            {"fields": exc.fields},
        ) from None
    except services.TriggerPayloadMismatch as exc:
        raise ApiError(409, "idempotency_key_reused", str(exc), {"run_id": exc.run_id}) from None
    except services.QuotaExceeded as exc:
        raise over_quota(exc) from None
    except SessionOverflow as exc:
        raise ApiError(
            429,
            "session_busy",
            str(exc),
            {"session_key": exc.session_key, "waiting": exc.waiting, "limit": exc.limit},
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    if not start.created:
        response["Idempotent-Replayed"] = "true"
    if start.created and start.steps is not None:
        return Status(201, selectors.run_detail_as_started(start.run, start.steps))
    return Status(201 if start.created else 200, selectors.run_detail(start.run))


@router.get("/runs", response=RunPage)
def run_list(request: HttpRequest, filters: Query[RunFilters]) -> dict[str, Any]:
    if filters.status and filters.status not in RunStatus.values:
        raise ApiError(400, "invalid_request", f"status must be one of {', '.join(RunStatus.values)}")
    runs = selectors.runs_for_user(
        request_user(request),
        status=filters.status,
        workflow=filters.workflow,
        correlation_id=filters.correlation_id,
        tenant=filters.tenant,
        session_key=filters.session_key,
    )
    try:
        page, next_cursor = selectors.run_page(runs, cursor=filters.cursor, limit=filters.limit)
    except ValueError as bad:
        raise ApiError(422, "invalid_input", str(bad), {"fields": {"cursor": str(bad)}}) from bad
    return {"items": [selectors.run_summary(run) for run in page], "next_cursor": next_cursor}


def _get_run_for_user(user: User, run_id: str) -> Run:
    if "\x00" in run_id:  # no run has one, and PostgreSQL refuses to be asked
        raise Http404("No run matches the given query.")
    return get_object_or_404(selectors.runs_for_user(user), pk=run_id)


@router.get("/runs/{run_id}", response=RunOut)
def run_get(request: HttpRequest, run_id: str) -> dict[str, Any]:
    run = _get_run_for_user(request_user(request), run_id)
    return selectors.run_detail(run)


@router.post("/runs/{run_id}/cancel", response=RunOut)
def run_cancel(request: HttpRequest, run_id: str) -> dict[str, Any]:
    user = request_user(request)
    run = _get_run_for_user(user, run_id)
    access.access_operate_run(user, run)
    if not services.run_cancel(
        run=run, actor=user.get_username(), reason=f"cancelled by {user.get_username()}", by=user
    ):
        run.refresh_from_db()
        raise ApiError(
            409, "run_finished", f"run {run.id} already finished ({run.status})", {"status": run.status}
        )
    run.refresh_from_db()
    return selectors.run_detail(run)


class ReplayIn(InputSchema):
    input: dict[str, Any] | None = Field(
        default=None, description="new input for the replay (validated); the original's when left out"
    )
    connections: dict[str, str] = Field(
        default_factory=dict, description="connections by provider, instead of the ones the original bound"
    )


@router.post("/runs/{run_id}/retry", response=RunOut)
def run_retry(request: HttpRequest, run_id: str) -> dict[str, Any]:
    """Retry a failed, cancelled or expired run from its first unfinished step: same run, same
    idempotency keys, so nothing that committed happens again."""
    user = request_user(request)
    run = _get_run_for_user(user, run_id)
    access.access_operate_run(user, run)
    try:
        run = services.run_retry(run=run, actor=user.get_username(), by=user)
    except services.RunNotRetryable as exc:
        raise ApiError(409, "run_not_retryable", str(exc), {"status": run.status}) from None
    return selectors.run_detail(run)


def _replay_body(request: HttpRequest) -> ReplayIn:
    """The optional body of a replay: none at all, ``{}``, or ``{"input": {...}, "connections": {...}}``."""
    if not request.body.strip():
        return ReplayIn()
    try:
        data = json.loads(request.body)
    except ValueError as exc:
        raise ApiError(400, "malformed_json", f"The request body is not valid JSON: {exc}") from None
    try:
        return ReplayIn.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ApiError(
            422, "invalid_input", "The request does not fit.", {"fields": pydantic_fields(exc)}
        ) from None


@router.post(
    "/runs/{run_id}/replay",
    response={201: RunOut},
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ReplayIn.model_json_schema()}},
        }
    },
)
def run_replay(request: HttpRequest, run_id: str) -> Status[dict[str, Any]]:
    """Start the run again as a new run linked to it, optionally with edited input (the body
    may be left out)."""
    user = request_user(request)
    run = _get_run_for_user(user, run_id)
    access.access_operate_run(user, run)
    body = _replay_body(request)
    try:
        replay = services.run_replay(
            run=run, actor=user.get_username(), input=body.input, connections=body.connections
        )
    except UnknownWorkflow as exc:
        raise ApiError(409, "workflow_gone", str(exc)) from None
    except InvalidInput as exc:
        raise ApiError(
            422, "invalid_input", f"The input does not fit workflow {run.workflow}.", {"fields": exc.fields}
        ) from None
    except services.QuotaExceeded as exc:
        raise over_quota(exc) from None
    except SessionOverflow as exc:
        raise ApiError(429, "session_busy", str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    return Status(201, selectors.run_detail(replay))


@router.get("/leases", response=list[LeaseOut])
def lease_list(request: HttpRequest) -> list[dict[str, Any]]:
    return [selectors.lease_detail(lease) for lease in selectors.live_leases_for_user(request_user(request))]
