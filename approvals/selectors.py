"""Reads of the approvals app."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import BigIntegerField, Count, Exists, F, OuterRef, QuerySet, Subquery
from django.db.models.fields.json import KT
from django.db.models.functions import Cast

from approvals.models import (
    ApprovalRequest,
    ApprovalStatus,
    Artifact,
    ArtifactVersion,
    ConflictArtifact,
    ConflictKind,
    ConflictStatus,
)
from approvals.workflows import ACTION_CALL
from core import rawsql
from core.models import Membership, Notification, Role, Tenant
from core.selectors import AnyUser, scope_to_user
from runs.explain import Wait
from runs.models import Run, RunStatus, Step, StepStatus
from runs.selectors import step_with_run


def approvals_for_user(user: AnyUser, *, status: str = "", run_id: str = "") -> QuerySet[ApprovalRequest]:
    """The user's requests, newest first. Their step, run, artifact and shown version come in one
    query each for the whole page (prefetched), not in one join: PostgreSQL took 7 ms to plan
    that seven-table join (0.3 ms to run it), on every list and inbox read."""
    requests = scope_to_user(
        ApprovalRequest.objects.select_related("tenant", "decided_by").prefetch_related(
            "step", "run", "artifact", "artifact_version"
        ),
        user,
    )
    if status:
        requests = requests.filter(status=status)
    if run_id:
        requests = requests.filter(run_id=run_id)
    return requests.order_by("-id")


# One of a user's requests by id, with its tenant, shown version and artifact. Hand-written and
# prepared on the request thread's connection (core.rawsql): PostgreSQL took longer to plan the
# ORM's join (about 1 ms; see docs/BENCHMARKS.md) than to run it, and the ORM longer to build it.
_APPROVAL_SQL = (
    f"SELECT {rawsql.select_list(ApprovalRequest, 'a')}, {rawsql.select_list(Tenant, 't')},"
    f" {rawsql.select_list(ArtifactVersion, 'v')}, {rawsql.select_list(Artifact, 'f')}"
    " FROM approvals_approvalrequest a JOIN core_tenant t ON t.id = a.tenant_id"
    " JOIN approvals_artifactversion v ON v.id = a.artifact_version_id"
    " JOIN approvals_artifact f ON f.id = a.artifact_id WHERE a.id = %s"
    f" AND a.tenant_id IN (SELECT tenant_id FROM {Membership._meta.db_table} WHERE user_id = %s)"
)
# The largest id a request can have (a bigint): a larger one names none.
_MAX_ID = 2**63 - 1


def approval_for_user(user: AnyUser, approval_id: int) -> ApprovalRequest:
    """One of the user's requests by id (``ApprovalRequest.DoesNotExist`` otherwise: another
    tenant's is not theirs), with its tenant, step, run, shown version and artifact, linked to
    each other so that none is read twice: its step's run and its artifact's step are the
    request's own."""
    rows = []
    if user.is_authenticated and 0 < approval_id <= _MAX_ID:
        rows = rawsql.fetch_rows(_APPROVAL_SQL, [approval_id, user.pk])
    if not rows:
        raise ApprovalRequest.DoesNotExist(f"no approval request {approval_id} for this user")
    request, tenant, shown, artifact = rawsql.from_joined_row(
        rows[0], ApprovalRequest, Tenant, ArtifactVersion, Artifact
    )
    request.tenant, request.artifact_version, request.artifact = tenant, shown, artifact
    try:
        request.step = step_with_run(request.step_id)  # the runs app reads its own rows
    except Step.DoesNotExist:  # its run purged since the read above: the request went with it
        raise ApprovalRequest.DoesNotExist(f"no approval request {approval_id}") from None
    request.run = request.step.run if request.step.run_id == request.run_id else request.run
    if request.artifact.step_id == request.step_id:
        request.artifact.step = request.step
    return request


def conflicts_for_user(user: AnyUser, *, status: str = "", kind: str = "") -> QuerySet[ConflictArtifact]:
    conflicts = scope_to_user(
        ConflictArtifact.objects.select_related("tenant", "step", "run", "resolved_by"), user
    )
    if status:
        conflicts = conflicts.filter(status=status)
    if kind:
        conflicts = conflicts.filter(kind=kind)
    return conflicts.order_by("-id")


def _lines(content: Any) -> list[str]:
    if isinstance(content, dict) and all(isinstance(v, str) for v in content.values()):
        lines = []
        for key, value in content.items():
            lines.append(f"{key}:")
            lines.extend(f"  {line}" for line in value.splitlines() or [""])
        return lines
    return json.dumps(content, indent=2, sort_keys=True, default=str).splitlines()


def content_diff(before: Any, after: Any, *, before_label: str, after_label: str) -> list[str]:
    """A unified diff of two artifact contents, line by line."""
    return list(difflib.unified_diff(_lines(before), _lines(after), before_label, after_label, lineterm=""))


# An artifact's versions by number, and the newest of them that was ever approved (what an edit
# may have changed).
Versions = tuple[dict[int, ArtifactVersion], ArtifactVersion | None]


def artifact_versions(artifact: Artifact) -> Versions:
    """The artifact's versions and the newest approved, in one statement."""
    return artifacts_versions([artifact.pk])[artifact.pk]


def artifacts_versions(artifact_ids: Sequence[int]) -> dict[int, Versions]:
    """``artifact_versions`` of each artifact, by id, in one statement for all of them (a page of
    requests reads its artifacts' versions at once, not one query per card)."""
    found: dict[int, dict[int, ArtifactVersion]] = {pk: {} for pk in artifact_ids}
    approved: dict[int, int | None] = {}
    if found:
        among, params = rawsql.among(sorted(found))
        for row in rawsql.fetch_rows(_VERSIONS_SQL.format(among=among), params):
            version = rawsql.from_row(ArtifactVersion, row)
            found[version.artifact_id][version.number] = version
            approved[version.artifact_id] = row[-1]  # the same on every row of an artifact
    return {
        pk: (versions, next((v for v in versions.values() if v.pk == approved.get(pk)), None))
        for pk, versions in found.items()
    }


# Artifacts' versions, each row with the id of the newest version of its artifact a decision
# approved: one that reached its quorum (votes short of one leave the request pending, or
# withdrawn).
_VERSIONS_SQL = (
    f"SELECT {rawsql.select_list(ArtifactVersion, 'v')}, (SELECT a.artifact_version_id"
    " FROM approvals_approvalrequest a WHERE a.artifact_id = v.artifact_id AND a.decided_at IS NOT NULL"
    " AND a.approvals > 0"
    f" AND a.status NOT IN ({rawsql.sql_strings(ApprovalStatus.PENDING, ApprovalStatus.WITHDRAWN)})"
    " ORDER BY a.id DESC LIMIT 1) FROM approvals_artifactversion v WHERE v.artifact_id {among}"
)


def request_for_version(version: ArtifactVersion) -> ApprovalRequest:
    """The approval request an edit opened for the version it wrote (in the same transaction),
    read without the editor's scope: their role may be gone by the time they read it back."""
    opened = ApprovalRequest.objects.filter(artifact_version=version).select_related(
        "step__run", "artifact_version"
    )
    return opened.earliest("pk")


def approvals_whole(requests: Iterable[ApprovalRequest]) -> list[ApprovalRequest]:
    """The requests of a page read with every row they show (``approvals_for_user``'s
    prefetches): one whose run went (its tenant deleted) between the page's query and them is
    left out, as a join would have left it out."""
    return [
        request
        for request in requests
        if None not in (request.step, request.run, request.artifact, request.artifact_version)
    ]


def approval_details(requests: Sequence[ApprovalRequest]) -> list[dict[str, Any]]:
    """``approval_detail`` of each request, their artifacts' versions read in one statement."""
    versions = artifacts_versions([request.artifact_id for request in requests])
    return [approval_detail(request, versions[request.artifact_id]) for request in requests]


def approval_detail(request: ApprovalRequest, versions_read: Versions | None = None) -> dict[str, Any]:
    """What the API and the inbox show of a request. ``versions_read``: its artifact's versions,
    where the caller read them already (``approval_details``)."""
    artifact = request.artifact
    versions, baseline = versions_read or artifact_versions(artifact)
    latest = versions[artifact.latest_version]
    shown = request.artifact_version
    if baseline is None or baseline.number == shown.number:
        baseline = versions.get(shown.number - 1)
    diff = (
        content_diff(
            baseline.content,
            shown.content,
            before_label=f"v{baseline.number}",
            after_label=f"v{shown.number}",
        )
        if baseline
        else []
    )
    return {
        "id": request.pk,
        "tenant": request.tenant.slug,
        "run_id": request.run_id,
        "workflow": request.run.workflow,
        "step_key": request.step.key,
        "status": request.status,
        "version": request.version,
        "artifact_version": shown.number,
        "artifact": {
            "id": artifact.pk,
            "kind": artifact.kind,
            "call_key": artifact.call_key,
            "latest_version": latest.number,
            "content": shown.content,
            "author": shown.author,
            "source": shown.source,
        },
        "required": request.required,
        "approvals": request.approvals,
        "escalated": request.escalated,
        "decided_by": request.decided_by.get_username() if request.decided_by else None,
        "decided_at": request.decided_at,
        "comment": request.comment,
        "expires_at": request.expires_at,
        "created_at": request.created_at,
        "diff_against": baseline.number if baseline else None,
        "diff": diff,
    }


def conflict_detail(conflict: ConflictArtifact) -> dict[str, Any]:
    return {
        "id": conflict.pk,
        "tenant": conflict.tenant.slug,
        "kind": conflict.kind,
        "status": conflict.status,
        "version": conflict.version,
        "target_key": conflict.target_key,
        "run_id": conflict.run_id,
        "step_key": conflict.step.key if conflict.step else None,
        "effect_key": conflict.effect.idempotency_key if conflict.effect_id and conflict.effect else None,
        "current": conflict.current,
        "proposed": conflict.proposed,
        "diff": content_diff(
            conflict.proposed, conflict.current, before_label="proposed", after_label="current"
        ),
        "timing": conflict.timing,
        "suggestion": conflict.suggestion,
        "resolution": conflict.resolution,
        "resolved_by": conflict.resolved_by.get_username() if conflict.resolved_by else None,
        "resolved_at": conflict.resolved_at,
        "note": conflict.note,
        "created_at": conflict.created_at,
    }


def open_conflict_samples() -> list[tuple[dict[str, str], float]]:
    rows = (
        ConflictArtifact.objects.filter(status="open").values("kind").annotate(n=Count("id")).order_by("kind")
    )
    return [({"kind": r["kind"]}, r["n"]) for r in rows]


def conflict_kinds_known() -> list[dict[str, str]]:
    """Every kind of conflict: the gauge shows 0 where none is open."""
    return [{"kind": kind} for kind in ConflictKind.values]


def parked_without_request(now: datetime) -> list[str]:
    """Invariant: a step waiting for approval has a pending request; one in conflict has an open
    conflict artifact (someone can act on it)."""
    pending = ApprovalRequest.objects.filter(step_id=OuterRef("pk"), status=ApprovalStatus.PENDING)
    open_conflict = ConflictArtifact.objects.filter(step_id=OuterRef("pk"), status=ConflictStatus.OPEN)
    waiting = Step.objects.filter(status=StepStatus.WAITING_APPROVAL).filter(~Exists(pending))
    held = Step.objects.filter(status=StepStatus.CONFLICT).filter(~Exists(open_conflict))
    return [
        *(
            f"step {r}:{k} waits for approval with no pending request"
            for r, k in waiting.values_list("run_id", "key")[:100]
        ),
        *(
            f"step {r}:{k} is in conflict with no open conflict"
            for r, k in held.values_list("run_id", "key")[:100]
        ),
    ]


def human_waits(steps: Sequence[Step]) -> dict[int, Wait]:
    """For steps parked for a human, what they wait for and who may settle it (the run page's
    "why not running"): the pending approval and the members who may decide, or the open
    conflict a reviewer must resolve. Three queries for any number of steps."""
    from django.urls import reverse

    waits: dict[int, Wait] = {}
    waiting = [s.pk for s in steps if s.status == StepStatus.WAITING_APPROVAL]
    requests = list(
        ApprovalRequest.objects.filter(step_id__in=waiting, status=ApprovalStatus.PENDING).order_by("pk")
    )
    deciders: dict[tuple[int, str], list[str]] = {}
    if requests:
        for tenant_id, role, username in Membership.objects.filter(
            tenant_id__in={r.tenant_id for r in requests}
        ).values_list("tenant_id", "role", "user__username"):
            deciders.setdefault((tenant_id, role), []).append(username)
    for request in requests:
        roles = [*request.eligible_roles, Role.ADMIN] if request.eligible_roles else [Role.ADMIN]
        names = sorted({n for role in roles for n in deciders.get((request.tenant_id, role), [])})
        who = ", ".join(names[:6]) + (" …" if len(names) > 6 else "") if names else "nobody yet: add a member"
        waits[request.step_id] = Wait(
            "human",
            f"waits for approval #{request.pk} ({request.approvals} of {request.required}) from "
            f"{' or '.join(request.eligible_roles) or 'admin'}; may decide: {who}",
            until=request.expires_at,
            link=f"{reverse('approvals:approval-inbox')}#approval-{request.pk}",
        )
    conflicted = [s.pk for s in steps if s.status == StepStatus.CONFLICT]
    for conflict in ConflictArtifact.objects.filter(step_id__in=conflicted, status=ConflictStatus.OPEN):
        waits[conflict.step_id or 0] = Wait(
            "human",
            f"waits for a reviewer to resolve conflict #{conflict.pk} ({conflict.kind.replace('_', ' ')})",
            key=conflict.target_key,
            link=f"{reverse('approvals:conflict-queue')}#conflict-{conflict.pk}",
        )
    return waits


def approvals_overview(tenant_ids: Sequence[int], slugs: dict[int, str], now: datetime) -> dict[str, Any]:
    """The overview's human section: pending approvals (count, oldest age) and open conflicts
    by kind."""
    pending = ApprovalRequest.objects.filter(tenant_id__in=tenant_ids, status=ApprovalStatus.PENDING)
    oldest = pending.order_by("created_at").values_list("created_at", flat=True).first()
    conflicts = list(
        ConflictArtifact.objects.filter(tenant_id__in=tenant_ids, status=ConflictStatus.OPEN)
        .values("kind")
        .annotate(n=Count("id"))
        .order_by("-n", "kind")
    )
    return {
        "pending": pending.count(),
        "oldest_seconds": round((now - oldest).total_seconds()) if oldest else None,
        "conflicts": conflicts,
        "conflicts_total": sum(c["n"] for c in conflicts),
    }


def pending_count_for_user(user: AnyUser) -> int:
    """The inbox badge: pending requests in the user's tenants."""
    return scope_to_user(ApprovalRequest.objects.filter(status=ApprovalStatus.PENDING), user).count()


# What became of a request, in words: the inbox's cards and its notifications say the same.
DECIDED_VERBS = {
    ApprovalStatus.APPROVED: "approved",
    ApprovalStatus.REJECTED: "rejected",
    ApprovalStatus.CHANGES_REQUESTED: "sent back for changes",
    ApprovalStatus.INVALIDATED: "invalidated by an edit",
    ApprovalStatus.EXPIRED: "expired",
    ApprovalStatus.WITHDRAWN: "withdrawn (its run was cancelled)",
}
# Decisions a person takes, which name who took it.
DECIDED_BY_SOMEONE = (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED, ApprovalStatus.CHANGES_REQUESTED)


def approval_state_words(status: str, decided_by: str | None) -> str:
    """A request's state now, in words: "waiting for a decision", "approved by ada", "expired"."""
    if status == ApprovalStatus.PENDING:
        return "waiting for a decision"
    words = DECIDED_VERBS.get(ApprovalStatus(status), status)
    return f"{words} by {decided_by}" if decided_by and status in DECIDED_BY_SOMEONE else words


@dataclass(frozen=True)
class NotificationLine:
    """An in-app notification as the inbox lists it, with its request's state now."""

    kind: str  # approval_requested | approval_escalated
    payload: dict[str, Any]
    tenant: str
    created_at: datetime
    approval_status: str  # "" when the request no longer exists
    approval_state: str  # in words: "approved by ada", "waiting for a decision"


def notifications_for_user(user: AnyUser, limit: int = 10) -> list[NotificationLine]:
    """The newest in-app notifications of the user's tenants, each with the state of its request
    now, not as it was when it was sent: read in the same query (a subquery per column, on the
    request's primary key)."""
    request = ApprovalRequest.objects.filter(pk=OuterRef("approval_pk"), tenant_id=OuterRef("tenant_id"))
    rows = (
        scope_to_user(Notification.objects.all(), user)
        .annotate(approval_pk=Cast(KT("payload__approval_id"), BigIntegerField()))
        .annotate(
            approval_status=Subquery(request.values("status")[:1]),
            approval_decided_by=Subquery(request.values("decided_by__username")[:1]),
        )
        .order_by("-id")
        .values(
            "kind", "payload", "created_at", "approval_status", "approval_decided_by", slug=F("tenant__slug")
        )
    )
    return [
        NotificationLine(
            kind=row["kind"],
            payload=row["payload"],
            tenant=row["slug"],
            created_at=row["created_at"],
            approval_status=row["approval_status"] or "",
            approval_state=(
                approval_state_words(row["approval_status"], row["approval_decided_by"])
                if row["approval_status"]
                else "no longer exists"
            ),
        )
        for row in rows[:limit]
    ]


def _decision_output(run: Run) -> dict[str, Any]:
    output = Step.objects.filter(run=run).values_list("output", flat=True).first()
    return output if isinstance(output, dict) else {}


def outside_decision(run: Run) -> dict[str, Any]:
    """Where the human decision on an outside agent's proposed action stands: ``pending`` (its
    request is not open yet, or waits), ``approved`` with the action as approved (possibly
    edited), ``rejected`` or ``expired`` with the reason, ``withdrawn`` (its run was cancelled)."""
    request = (
        ApprovalRequest.objects.filter(run=run, artifact__call_key=ACTION_CALL)
        .select_related("artifact", "artifact_version", "decided_by")
        .order_by("-id")
        .first()
    )
    answer: dict[str, Any] = {"id": run.pk, "status": "pending", "approval_id": None, "action": None,
                              "reason": "", "decided_by": None, "decided_at": None}  # fmt: skip
    if run.status == RunStatus.CANCELLED:
        answer["status"] = "withdrawn"
    if request is None:
        return answer
    answer.update(
        approval_id=request.pk,
        decided_by=request.decided_by.get_username() if request.decided_by else None,
        decided_at=request.decided_at,
    )
    # Approved once the decision's step recorded it (the approved action, in its output): an
    # edit until then invalidates the approval, and the agent must not act on one that goes.
    if (
        run.status == RunStatus.SUCCEEDED
        and (run_output := _decision_output(run)).get("decision") == "approved"
    ):
        answer.update(status="approved", action=run_output.get("action"))
    elif request.status in (ApprovalStatus.REJECTED, ApprovalStatus.EXPIRED):
        answer.update(status=str(request.status), reason=request.comment or str(request.status))
    elif request.status == ApprovalStatus.WITHDRAWN:
        answer.update(status="withdrawn", reason=request.comment)
    return answer
