"""Approvals and conflicts API (v1): compare-and-set decisions over HTTP with ETag/If-Match."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Field, Query, Router, Schema, Status

from approvals import access, selectors, services
from approvals.models import ApprovalRequest, ApprovalStatus, ConflictKind, ConflictStatus
from core.api import ApiError, request_user

router = Router(tags=["approvals"])


class ArtifactOut(Schema):
    id: int
    kind: str = Field(description="the gated step's tool or lane; for a governed call, its tool")
    call_key: str = Field(
        description="empty for a gated step's draft; a governed tool call's key in its step"
    )
    latest_version: int
    content: Any
    author: str
    source: str


class ApprovalOut(Schema):
    id: int
    tenant: str
    run_id: str
    workflow: str
    step_key: str
    status: str
    version: int
    artifact_version: int
    artifact: ArtifactOut
    required: int
    approvals: int
    escalated: bool
    decided_by: str | None
    decided_at: datetime | None
    comment: str
    expires_at: datetime | None
    created_at: datetime
    diff_against: int | None
    diff: list[str]


class ConflictOut(Schema):
    id: int
    tenant: str
    kind: str
    status: str
    version: int
    target_key: str
    run_id: str | None
    step_key: str | None
    effect_key: str | None
    current: Any = None
    proposed: Any = None
    diff: list[str]
    timing: dict[str, Any]
    suggestion: str
    resolution: str
    resolved_by: str | None
    resolved_at: datetime | None
    note: str
    created_at: datetime


class DecisionIn(Schema):
    comment: str = Field(default="", max_length=2000)


class EditIn(Schema):
    content: Any


class ResolveIn(Schema):
    resolution: str
    note: str = Field(default="", max_length=2000)
    external_ref: str = Field(default="", max_length=300)


class ApprovalFilters(Schema):
    status: str = ""
    run_id: str = ""


class ConflictFilters(Schema):
    status: str = ""
    kind: str = ""


def if_match(request: HttpRequest) -> int:
    """The version named by If-Match (428 without it, 400 if it is not a version)."""
    raw = request.headers.get("If-Match")
    if raw is None:
        raise ApiError(428, "precondition_required", 'Send If-Match: "<version>" (the ETag you read).')
    value = raw.strip().removeprefix("W/").strip('"')
    if not (value.isascii() and value.isdigit()):
        raise ApiError(400, "invalid_request", f'If-Match must be a version such as "3", got {raw!r}')
    return int(value)


def _etag(response: HttpResponse, version: int) -> None:
    response["ETag"] = f'"{version}"'


def _approval(request: HttpRequest, approval_id: int) -> ApprovalRequest:
    try:
        return selectors.approval_for_user(request_user(request), approval_id)
    except ApprovalRequest.DoesNotExist:
        raise Http404("No ApprovalRequest matches the given query.") from None


@router.get("/approvals", response=list[ApprovalOut])
def approval_list(request: HttpRequest, filters: Query[ApprovalFilters]) -> list[dict[str, Any]]:
    if filters.status and filters.status not in ApprovalStatus.values:
        raise ApiError(400, "invalid_request", f"status must be one of {', '.join(ApprovalStatus.values)}")
    requests = selectors.approvals_for_user(
        request_user(request), status=filters.status, run_id=filters.run_id
    )
    return selectors.approval_details(selectors.approvals_whole(requests[:200]))


@router.get("/approvals/{approval_id}", response=ApprovalOut)
def approval_get(request: HttpRequest, approval_id: int, response: HttpResponse) -> dict[str, Any]:
    approval = _approval(request, approval_id)
    _etag(response, approval.version)
    return selectors.approval_detail(approval)


def _decide(
    request: HttpRequest, approval_id: int, decision: str, comment: str, response: HttpResponse
) -> dict[str, Any]:
    approval = _approval(request, approval_id)
    expected = if_match(request)
    try:
        decided = services.approval_decide(
            request=approval,
            user=request_user(request),
            decision=decision,
            expected_version=expected,
            comment=comment,
        )
    except services.DecisionConflict as lost:
        current = selectors.approval_detail(lost.current)
        who = current["decided_by"] or "nobody"
        raise ApiError(
            412,
            "precondition_failed",
            f"approval {approval_id} is {current['status']} at version {current['version']} "
            f"(decided by {who} on artifact version {current['artifact_version']}); nothing was changed",
            {"current": current},
            headers={"ETag": f'"{current["version"]}"'},
        ) from None
    except services.DecisionForbidden as exc:
        raise ApiError(403, "forbidden", str(exc)) from None
    _etag(response, decided.version)
    return selectors.approval_detail(decided)


@router.post("/approvals/{approval_id}/approve", response=ApprovalOut)
def approval_approve(
    request: HttpRequest, approval_id: int, payload: DecisionIn, response: HttpResponse
) -> dict[str, Any]:
    return _decide(request, approval_id, "approve", payload.comment, response)


@router.post("/approvals/{approval_id}/reject", response=ApprovalOut)
def approval_reject(
    request: HttpRequest, approval_id: int, payload: DecisionIn, response: HttpResponse
) -> dict[str, Any]:
    return _decide(request, approval_id, "reject", payload.comment, response)


@router.post("/approvals/{approval_id}/request_changes", response=ApprovalOut)
def approval_request_changes(
    request: HttpRequest, approval_id: int, payload: DecisionIn, response: HttpResponse
) -> dict[str, Any]:
    return _decide(request, approval_id, "request_changes", payload.comment, response)


@router.post("/approvals/{approval_id}/artifact", response={201: ApprovalOut})
def approval_edit_artifact(
    request: HttpRequest, approval_id: int, payload: EditIn, response: HttpResponse
) -> Status[dict[str, Any]]:
    approval = _approval(request, approval_id)
    user = request_user(request)
    access.access_edit_artifact(user, approval.tenant.slug)  # before If-Match: 403 over 428
    expected = if_match(request)
    try:
        version = services.artifact_edit(
            artifact=approval.artifact, user=user, expected_version=expected, content=payload.content
        )
    except services.EditConflict as lost:
        # What stands now: the step's newest approval request, with the version that won.
        newest = selectors.approvals_for_user(user).filter(step=approval.step).order_by("-pk").first()
        details: dict[str, Any] = {
            "latest_version": lost.artifact.latest_version,
            "current": selectors.approval_detail(newest or approval),
        }
        if lost.conflict is not None:
            details["conflict_id"] = lost.conflict.pk
        raise ApiError(
            412 if lost.conflict is not None else 409,
            "precondition_failed" if lost.conflict is not None else "step_finished",
            f"artifact is at version {lost.artifact.latest_version}; your edit was based on {expected}"
            if lost.conflict is not None
            else "the step already finished; its artifact can no longer change",
            details,
            headers={"ETag": f'"{lost.artifact.latest_version}"'},
        ) from None
    new_request = selectors.request_for_version(version)
    _etag(response, version.number)
    return Status(201, selectors.approval_detail(new_request))


@router.get("/conflicts", response=list[ConflictOut])
def conflict_list(request: HttpRequest, filters: Query[ConflictFilters]) -> list[dict[str, Any]]:
    if filters.status and filters.status not in ConflictStatus.values:
        raise ApiError(400, "invalid_request", f"status must be one of {', '.join(ConflictStatus.values)}")
    if filters.kind and filters.kind not in ConflictKind.values:
        raise ApiError(400, "invalid_request", f"kind must be one of {', '.join(ConflictKind.values)}")
    conflicts = selectors.conflicts_for_user(request_user(request), status=filters.status, kind=filters.kind)
    return [selectors.conflict_detail(c) for c in conflicts[:200]]


@router.get("/conflicts/{conflict_id}", response=ConflictOut)
def conflict_get(request: HttpRequest, conflict_id: int, response: HttpResponse) -> dict[str, Any]:
    conflict = get_object_or_404(selectors.conflicts_for_user(request_user(request)), pk=conflict_id)
    _etag(response, conflict.version)
    return selectors.conflict_detail(conflict)


@router.post("/conflicts/{conflict_id}/resolve", response=ConflictOut)
def conflict_resolve(
    request: HttpRequest, conflict_id: int, payload: ResolveIn, response: HttpResponse
) -> dict[str, Any]:
    user = request_user(request)
    conflict = get_object_or_404(selectors.conflicts_for_user(user), pk=conflict_id)
    access.access_resolve_conflict(user, conflict.tenant.slug)  # before If-Match: 403 over 428
    expected = if_match(request)
    try:
        resolved = services.conflict_resolve(
            conflict=conflict,
            user=user,
            expected_version=expected,
            resolution=payload.resolution,
            note=payload.note,
            external_ref=payload.external_ref,
        )
    except services.InvalidResolution as exc:
        raise ApiError(exc.status, "invalid_resolution", str(exc)) from None
    except services.ResolutionConflict as lost:
        current = selectors.conflict_detail(lost.current)
        raise ApiError(
            412,
            "precondition_failed",
            f"conflict {conflict_id} is {current['status']} at version {current['version']}; "
            "nothing was changed",
            {"current": current},
            headers={"ETag": f'"{current["version"]}"'},
        ) from None
    _etag(response, resolved.version)
    return selectors.conflict_detail(resolved)
