"""Operator console pages for approvals and conflicts: server-rendered, with htmx partials.

Each card is a ``{% partialdef %}`` inside its page template. A decision, an edit or a
resolution posts the version the user saw, so it is a compare-and-set: the loser of a race gets
the same card back, re-rendered with the winner's decision and a notice (409), and nothing
changes. An htmx POST gets only that card back; a plain POST redirects to the list.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from approvals import access, selectors, services
from approvals.models import (
    ApprovalRequest,
    ApprovalStatus,
    ConflictArtifact,
    ConflictKind,
    ConflictStatus,
)
from core.http import HtmxHttpRequest, authenticated_user
from core.models import Role, User
from core.selectors import ROLE_GRANTS, memberships_for_user

PAGE_SIZE = 50
# Cards already on the screen stay there across live refreshes (showing their new state), so a
# card never vanishes under the user's cursor; a reload or a filter change drops them.
MAX_SHOWN = 100
DECISIONS = {"approve": "Approved", "reject": "Rejected", "request_changes": "Changes requested for"}
HEADLINE_FIELDS = ("subject", "title", "to")
MESSAGE_LEVELS = {"success": messages.SUCCESS, "warning": messages.WARNING, "error": messages.ERROR}


def _get_approval_for_user(request: HtmxHttpRequest, approval_id: int) -> ApprovalRequest:
    """The request if it belongs to one of the user's tenants; another tenant's is a 404."""
    try:
        return selectors.approval_for_user(authenticated_user(request), approval_id)
    except ApprovalRequest.DoesNotExist:
        raise Http404 from None


def _get_conflict_for_user(request: HtmxHttpRequest, conflict_id: int) -> ConflictArtifact:
    return get_object_or_404(selectors.conflicts_for_user(authenticated_user(request)), pk=conflict_id)


def _shown_ids(request: HtmxHttpRequest) -> list[int]:
    return [int(v) for v in request.GET.getlist("shown")[:MAX_SHOWN] if (v.isascii() and v.isdigit())]


def _is_text_fields(content: Any) -> bool:
    """Content edited as one textarea per field (a draft message), rather than as JSON."""
    return isinstance(content, dict) and bool(content) and all(isinstance(v, str) for v in content.values())


def _diff_rows(lines: list[str]) -> list[dict[str, str]]:
    rows = []
    for line in lines:
        if line.startswith(("---", "+++")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "same"
        rows.append({"kind": kind, "text": line})
    return rows


def _approval_card(
    approval: ApprovalRequest,
    *,
    notice: str = "",
    notice_level: str = "success",
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``detail``: the request's ``approval_detail``, where a page read its cards' at once."""
    detail = detail or selectors.approval_detail(approval)
    content = detail["artifact"]["content"]
    text_fields = _is_text_fields(content)
    return {
        **detail,
        "is_pending": approval.status == ApprovalStatus.PENDING,
        "decided_verb": selectors.DECIDED_VERBS.get(ApprovalStatus(approval.status), approval.status),
        # JSONB keeps keys sorted by length: put a message's subject back above its body.
        "text_fields": sorted(content.items(), key=lambda kv: kv[0] not in HEADLINE_FIELDS)
        if text_fields
        else [],
        "content_json": "" if text_fields else json.dumps(content, indent=2, sort_keys=True, default=str),
        "diff_rows": _diff_rows(detail["diff"]),
        "notice": notice,
        "notice_level": notice_level,
    }


def _approvals(user: User, *, status: str, shown: list[int]) -> list[ApprovalRequest]:
    requests = selectors.approvals_for_user(user)
    if status:
        requests = requests.filter(Q(status=status) | Q(pk__in=shown))
    return selectors.approvals_whole(requests[:PAGE_SIZE])


def _approval_cards(approvals: list[ApprovalRequest]) -> list[dict[str, Any]]:
    """A page's cards, their artifacts' versions read in one statement, not one per card."""
    details = selectors.approval_details(approvals)
    return [_approval_card(a, detail=detail) for a, detail in zip(approvals, details, strict=True)]


def _render_approval_card(
    request: HtmxHttpRequest, approval: ApprovalRequest, *, notice: str, level: str, status: int = 200
) -> HttpResponse:
    card = _approval_card(approval, notice=notice, notice_level=level)
    return render(request, "approvals/inbox.html#approval-card", {"card": card}, status=status)


def _lost_decision_notice(current: ApprovalRequest) -> str:
    """Who won, when and on which artifact version (the loser's decision changed nothing)."""
    verb = selectors.DECIDED_VERBS.get(ApprovalStatus(current.status), current.status)
    if current.status == ApprovalStatus.PENDING:
        # Still pending, but someone voted or it was escalated since the user loaded the card.
        return (
            f"This request changed since you loaded it (now {current.approvals} of {current.required} "
            "approvals) — your decision was not applied. Check it and decide again."
        )
    who = f" by {current.decided_by.get_username()}" if current.decided_by else ""
    when = f" at {current.decided_at:%H:%M:%S} UTC" if current.decided_at else ""
    return (
        f"Already {verb}{who}{when} on version {current.artifact_version.number} "
        "— your decision was not applied."
    )


@require_GET
@login_required
def approval_inbox(request: HtmxHttpRequest) -> HttpResponse:
    user = authenticated_user(request)
    status = request.GET.get("status", ApprovalStatus.PENDING).strip()
    shown = _shown_ids(request)
    context = {
        "cards": _approval_cards(_approvals(user, status=status, shown=shown)),
        "filters": {"status": status},
        "statuses": ApprovalStatus.choices,
        "notifications": [] if request.htmx else selectors.notifications_for_user(user),
    }
    template = "approvals/inbox.html#approvals-list" if request.htmx else "approvals/inbox.html"
    return render(request, template, context)


@require_GET
@login_required
def inbox_badge(request: HtmxHttpRequest) -> HttpResponse:
    """The nav's count of pending approvals, refreshed live by every page."""
    count = selectors.pending_count_for_user(authenticated_user(request))
    return render(request, "approvals/_badge.html", {"nav_pending_approvals": count})


@require_POST
@login_required
def approval_decide(request: HtmxHttpRequest, approval_id: int) -> HttpResponse:
    approval = _get_approval_for_user(request, approval_id)
    decision = request.POST.get("decision", "")
    expected = request.POST.get("expected_version", "")
    if decision not in DECISIONS or not (expected.isascii() and expected.isdigit()):
        return _reply(request, approval, "Send a decision and the version you saw.", "error", 400)
    try:
        decided = services.approval_decide(
            request=approval,
            user=authenticated_user(request),
            decision=decision,
            expected_version=int(expected),
            comment=request.POST.get("comment", "").strip()[:2000],
        )
    except services.DecisionConflict as lost:
        return _reply(request, lost.current, _lost_decision_notice(lost.current), "warning", 409)
    except services.DecisionForbidden as exc:
        return _reply(request, approval, f"Not applied: {exc}.", "error", 403)
    if decided.status == ApprovalStatus.PENDING:
        notice = f"Your approval was counted ({decided.approvals} of {decided.required})."
    else:
        notice = f"{DECISIONS[decision]} version {decided.artifact_version.number}."
    return _reply(request, decided, notice, "success", 200)


@require_POST
@login_required
def approval_edit(request: HtmxHttpRequest, approval_id: int) -> HttpResponse:
    approval = _get_approval_for_user(request, approval_id)
    user = authenticated_user(request)
    try:
        access.access_edit_artifact(user, approval.tenant.slug)
    except PermissionDenied as exc:
        return _reply(request, approval, f"Not saved: {exc}", "error", 403)
    expected = request.POST.get("expected_version", "")
    try:
        content = _edited_content(request)
    except ValueError as exc:
        return _reply(request, approval, f"Not saved: {exc}", "error", 400)
    if not (expected.isascii() and expected.isdigit()):
        return _reply(request, approval, "Not saved: send the version you edited.", "error", 400)
    try:
        version = services.artifact_edit(
            artifact=approval.artifact, user=user, expected_version=int(expected), content=content
        )
    except PermissionDenied as exc:  # the role was taken away while editing
        return _reply(request, approval, f"Not saved: {exc}", "error", 403)
    except services.EditConflict as lost:
        if lost.conflict is None:
            notice = "Not saved: the step already finished; its artifact can no longer change."
        else:
            notice = (
                f"Not saved: the artifact is at version {lost.artifact.latest_version} and your edit "
                f"was based on version {expected}. Your text is kept in conflict #{lost.conflict.pk} "
                "for a reviewer."
            )
        current = selectors.approvals_for_user(user).filter(step=approval.step).first() or approval
        return _reply(request, current, notice, "warning", 409)
    new_request = selectors.request_for_version(version)
    notice = f"Saved version {version.number}; earlier approvals are invalidated. It needs a new approval."
    return _reply(request, new_request, notice, "success", 200)


def _edited_content(request: HtmxHttpRequest) -> Any:
    """The new content: the ``field:<name>`` textareas of a draft, or the JSON textarea."""
    fields = {
        k.removeprefix("field:"): request.POST.get(k, "") for k in request.POST if k.startswith("field:")
    }
    if fields:
        # Browsers send CRLF line ends from a textarea; the agent writes LF.
        return {k: v.replace("\r\n", "\n") for k, v in fields.items()}
    try:
        return json.loads(request.POST.get("content_json", ""))
    except json.JSONDecodeError as exc:
        raise ValueError(f"the content is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _reply(
    request: HtmxHttpRequest, approval: ApprovalRequest, notice: str, level: str, status: int
) -> HttpResponse:
    if not request.htmx:
        messages.add_message(request, MESSAGE_LEVELS[level], notice)
        return redirect("approvals:approval-inbox")
    # Re-read with the inbox's joins: the service may have changed status, voters, decider.
    fresh = _get_approval_for_user(request, approval.pk)
    return _render_approval_card(request, fresh, notice=notice, level=level, status=status)


# Conflicts


def _conflict_card(
    conflict: ConflictArtifact, *, can_resolve: bool, notice: str = "", notice_level: str = "success"
) -> dict[str, Any]:
    detail = selectors.conflict_detail(conflict)
    diff = detail["diff"]
    current, proposed = conflict.current, conflict.proposed
    if (
        isinstance(current, dict)
        and isinstance(proposed, dict)
        and "content" in current
        and "content" in proposed
    ):
        # Two versions of an artifact (concurrent_edit): diff the contents, not their envelopes.
        based_on, author = proposed.get("based_on", "?"), proposed.get("author", "?")
        diff = selectors.content_diff(
            proposed["content"],
            current["content"],
            before_label=f"proposed by {author} (based on v{based_on})",
            after_label=f"current v{current.get('version', '?')} by {current.get('author', '?')}",
        )
    return {
        **detail,
        "is_open": conflict.status == ConflictStatus.OPEN,
        "can_resolve": can_resolve,
        "resolutions": sorted(services.resolutions_for(conflict)),
        "needs_external_ref": conflict.kind == ConflictKind.LEASE_EXPIRED_WITH_PENDING_EFFECT,
        "timing_rows": _timing_rows(detail["timing"]),
        "diff_rows": _diff_rows(diff),
        "notice": notice,
        "notice_level": notice_level,
    }


def _timing_rows(timing: dict[str, Any]) -> list[tuple[str, str]]:
    """``{"detected_at": "<iso>"}`` as ``("Detected", "2025-01-02 18:42:07")`` for the card."""
    rows = []
    for name, value in timing.items():
        shown = str(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                shown = f"{datetime.fromisoformat(value):%Y-%m-%d %H:%M:%S}"
        rows.append((name.removesuffix("_at").replace("_", " ").capitalize(), shown))
    return rows


def _reviewer_tenant_ids(user: User) -> set[int]:
    return {m.tenant_id for m in memberships_for_user(user) if Role.REVIEWER in ROLE_GRANTS[m.role]}


@require_GET
@login_required
def conflict_queue(request: HtmxHttpRequest) -> HttpResponse:
    user = authenticated_user(request)
    filters = {
        "status": request.GET.get("status", ConflictStatus.OPEN).strip(),
        "kind": request.GET.get("kind", "").strip(),
    }
    shown = _shown_ids(request)
    conflicts = selectors.conflicts_for_user(user).select_related("effect", "step")
    if filters["status"]:
        conflicts = conflicts.filter(Q(status=filters["status"]) | Q(pk__in=shown))
    if filters["kind"]:
        conflicts = conflicts.filter(Q(kind=filters["kind"]) | Q(pk__in=shown))
    reviewer_of = _reviewer_tenant_ids(user)
    context = {
        "cards": [_conflict_card(c, can_resolve=c.tenant_id in reviewer_of) for c in conflicts[:PAGE_SIZE]],
        "filters": filters,
        "statuses": ConflictStatus.choices,
        "kinds": ConflictKind.choices,
    }
    template = "approvals/conflicts.html#conflicts-list" if request.htmx else "approvals/conflicts.html"
    return render(request, template, context)


@require_POST
@login_required
def conflict_resolve(request: HtmxHttpRequest, conflict_id: int) -> HttpResponse:
    conflict = _get_conflict_for_user(request, conflict_id)
    user = authenticated_user(request)
    try:
        access.access_resolve_conflict(user, conflict.tenant.slug)
    except PermissionDenied as exc:
        return _conflict_reply(request, conflict, f"Not resolved: {exc}", "error", 403)
    expected = request.POST.get("expected_version", "")
    if not (expected.isascii() and expected.isdigit()):
        return _conflict_reply(request, conflict, "Not resolved: send the version you saw.", "error", 400)
    resolution = request.POST.get("resolution", "")
    try:
        resolved = services.conflict_resolve(
            conflict=conflict,
            user=user,
            expected_version=int(expected),
            resolution=resolution,
            note=request.POST.get("note", "").strip()[:2000],
            external_ref=request.POST.get("external_ref", "").strip()[:300],
        )
    except services.InvalidResolution as exc:
        return _conflict_reply(request, conflict, f"Not resolved: {exc}.", "error", exc.status)
    except PermissionDenied as exc:  # the role was taken away while resolving
        return _conflict_reply(request, conflict, f"Not resolved: {exc}", "error", 403)
    except services.ResolutionConflict as lost:
        current = lost.current
        who = f" by {current.resolved_by.get_username()}" if current.resolved_by else ""
        when = f" at {current.resolved_at:%H:%M:%S} UTC" if current.resolved_at else ""
        how = f" as {current.resolution}" if current.resolution else ""
        notice = f"Already resolved{who}{when}{how} — your resolution was not applied."
        if current.status == ConflictStatus.OPEN:
            notice = "This conflict changed since you loaded it — your resolution was not applied."
        return _conflict_reply(request, current, notice, "warning", 409)
    return _conflict_reply(request, resolved, "Your resolution was applied.", "success", 200)


def _conflict_reply(
    request: HtmxHttpRequest, conflict: ConflictArtifact, notice: str, level: str, status: int
) -> HttpResponse:
    if not request.htmx:
        messages.add_message(request, MESSAGE_LEVELS[level], notice)
        return redirect("approvals:conflict-queue")
    user = authenticated_user(request)
    fresh = _get_conflict_for_user(request, conflict.pk)
    card = _conflict_card(
        fresh, can_resolve=fresh.tenant_id in _reviewer_tenant_ids(user), notice=notice, notice_level=level
    )
    return render(request, "approvals/conflicts.html#conflict-card", {"card": card}, status=status)
