"""Operator console pages for runs and leases: server-rendered, with htmx partials.

Each page's main fragment is a ``{% partialdef %}`` inside the page template; an htmx request
(a filter change, a live refresh, the cancel button) gets only that fragment back.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from core import tracing
from core.http import HtmxHttpRequest, authenticated_user
from core.models import Event, Role
from core.selectors import get_tenant_for_user, tenants_for_user, user_can
from runs import access, explain, selectors, services
from runs.definitions import REGISTRY, UnknownWorkflow
from runs.models import Run, RunStatus, SessionState, Step
from runs.sessions import SessionOverflow, session_runs
from runs.transitions import RETRYABLE_RUN_STATUSES

RUN_FILTERS = ("status", "workflow", "correlation_id", "tenant")
PAGE_SIZE = 50
# A run's audit trail is short in practice; a retry storm must not make the page unbounded.
MAX_EVENTS = 200


def _get_run_for_user(request: HtmxHttpRequest, run_id: str) -> Run:
    """The run if it belongs to one of the user's tenants; another tenant's run is a 404."""
    return get_object_or_404(selectors.runs_for_user(authenticated_user(request)), pk=run_id)


def _compact_json(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _without_contract(payload: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in payload.items() if key != "contract"}


def _run_events(run: Run) -> list[Event]:
    """The run's audit events, oldest first (the newest ``MAX_EVENTS`` of them)."""
    newest = Event.objects.filter(tenant_id=run.tenant_id, subject=f"run:{run.id}").order_by("-id")
    events = list(newest[:MAX_EVENTS])
    events.reverse()
    return events


def _detail_context(
    request: HtmxHttpRequest, run: Run, *, notice: str = "", notice_level: str = "success"
) -> dict[str, Any]:
    user = authenticated_user(request)
    detail = selectors.run_detail(run)
    detail["input_json"] = _compact_json(detail["input"])
    waits = explain.explain_run(run, list(Step.objects.filter(run=run)))
    for step in detail["steps"]:
        step["output_json"] = _compact_json(step["output"])
        step["wait"] = waits.get(step["id"])
    return {
        "run": detail,
        "trace_url": tracing.trace_url(detail["trace_id"]),
        "timeline": _timeline(run, detail["steps"], detail["tool_calls"]),
        "events": [
            # The run's contract is on every event and already at the top of the page.
            {"event": event, "payload_json": _compact_json(_without_contract(event.payload))}
            for event in _run_events(run)
        ],
        # Offered while run_cancel would act; the POST checks the role again.
        "can_cancel": run.status in services.UNFINISHED_RUN_STATUSES
        and user_can(user, run.tenant, Role.OPERATOR),
        # A compensated run's effects were undone: it is replayed, not retried.
        "can_retry": run.status in RETRYABLE_RUN_STATUSES
        and not run.compensation
        and user_can(user, run.tenant, Role.OPERATOR),
        "can_replay": user_can(user, run.tenant, Role.OPERATOR),
        "replays": list(run.replays.order_by("id").values_list("id", "status")),
        "notice": notice,
        "notice_level": notice_level,
    }


TIMELINE_WIDTH = 1000


def _timeline(run: Run, steps: list[dict[str, Any]], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Each started step as a bar on the run's time axis (created → finished, or now), and
    under it each governed tool call it made, scaled to TIMELINE_WIDTH; drawn as SVG in the
    page, no script."""
    now = timezone.now()
    start = run.created_at
    end = run.finished_at or now
    span = max((end - start).total_seconds(), 0.001)
    rows: list[dict[str, Any]] = []
    y = 4
    for step in steps:
        for item, label, call in [(step, step["key"], None)] + [
            (c, f"{c['tool']} #{c['key']}", c) for c in calls if c["step"] == step["key"]
        ]:
            began = item["started_at"]
            if began is None:
                continue
            finished = item["finished_at"] or now
            x = (began - start).total_seconds() / span * TIMELINE_WIDTH
            width = max((finished - began).total_seconds() / span * TIMELINE_WIDTH, 2)
            rows.append(
                {
                    "key": label,
                    "call": call,
                    "status": item["status"],
                    "attempt": step["attempt"],
                    "x": round(min(x, TIMELINE_WIDTH - 2), 1),
                    "width": round(min(width, TIMELINE_WIDTH - x), 1),
                    "y": y,
                    "seconds": round((finished - began).total_seconds(), 3),
                }
            )
            y += 26 if call is None else 18
    return {"rows": rows, "height": y + 4, "width": TIMELINE_WIDTH, "span_seconds": round(span, 3)}


@require_GET
@login_required
def run_list(request: HtmxHttpRequest) -> HttpResponse:
    user = authenticated_user(request)
    filters = {name: request.GET.get(name, "").strip() for name in RUN_FILTERS}
    cursor = request.GET.get("cursor", "").strip()
    try:
        page, next_cursor = selectors.run_page(
            selectors.runs_for_user(user, **filters), cursor=cursor, limit=PAGE_SIZE
        )
    except ValueError:
        return HttpResponse("That page cursor is not one this list handed out.", status=400)
    context = {
        "runs": page,
        "filters": filters,
        "cursor": cursor,
        "next_cursor": next_cursor,
        "statuses": RunStatus.choices,
        "workflows": sorted(REGISTRY),
        "tenants": list(tenants_for_user(user)),
    }
    template = "runs/list.html#runs-table" if request.htmx else "runs/list.html"
    return render(request, template, context)


@require_GET
@login_required
def run_detail(request: HtmxHttpRequest, run_id: str) -> HttpResponse:
    run = _get_run_for_user(request, run_id)
    template = "runs/detail.html#run-detail" if request.htmx else "runs/detail.html"
    return render(request, template, _detail_context(request, run))


@require_POST
@login_required
def run_cancel(request: HtmxHttpRequest, run_id: str) -> HttpResponse:
    run, username = _run_for_operator(request, run_id)
    by = authenticated_user(request)
    cancelled = services.run_cancel(run=run, actor=username, reason=f"cancelled by {username}", by=by)
    # Another operator or the run itself may have finished it first; say so, change nothing.
    notice = f"Run {run.id} cancelled." if cancelled else f"Run {run.id} had already finished."
    return _notice(request, run, notice, ok=cancelled, status=200 if cancelled else 409)


def _run_for_operator(request: HtmxHttpRequest, run_id: str) -> tuple[Run, str]:
    """The run (404 for another tenant's) and the acting username, if the user may act on
    runs of its tenant (operators and admins; else 403)."""
    run = _get_run_for_user(request, run_id)
    user = authenticated_user(request)
    access.access_operate_run(user, run)
    return run, user.get_username()


def _notice(request: HtmxHttpRequest, run: Run, notice: str, ok: bool, status: int = 200) -> HttpResponse:
    """Answer a run action: the refreshed detail fragment for htmx (a refusal with its status:
    400 bad input, 409 the run's state), else a redirect with the notice."""
    if not request.htmx:
        messages.add_message(request, messages.SUCCESS if ok else messages.WARNING, notice)
        return redirect("runs:run-detail", run_id=run.id)
    run.refresh_from_db()
    context = _detail_context(request, run, notice=notice, notice_level="success" if ok else "warning")
    return render(request, "runs/detail.html#run-detail", context, status=status)


@require_POST
@login_required
def run_retry(request: HtmxHttpRequest, run_id: str) -> HttpResponse:
    run, username = _run_for_operator(request, run_id)
    try:
        services.run_retry(run=run, actor=username, by=authenticated_user(request))
    except services.RunNotRetryable as exc:
        return _notice(request, run, f"Not retried: {exc}", ok=False, status=409)
    return _notice(request, run, f"Run {run.id} retried from its first unfinished step.", ok=True)


@require_POST
@login_required
def run_replay(request: HtmxHttpRequest, run_id: str) -> HttpResponse:
    run, username = _run_for_operator(request, run_id)
    raw = request.POST.get("input", "").strip()
    try:
        edited = json.loads(raw) if raw else None
        if edited is not None and not isinstance(edited, dict):
            raise ValueError("the input must be a JSON object")
        replay = services.run_replay(run=run, actor=username, input=edited)
    except ValueError as exc:  # malformed JSON, or InvalidInput (a ValueError) with its fields
        return _notice(request, run, f"Not replayed: {exc}", ok=False, status=400)
    except (UnknownWorkflow, services.QuotaExceeded, SessionOverflow) as exc:
        return _notice(request, run, f"Not replayed: {exc}", ok=False, status=409)
    url = reverse("runs:run-detail", args=[replay.id])
    if request.htmx:
        return HttpResponse(status=204, headers={"HX-Redirect": url})
    messages.success(request, f"Replayed as {replay.id}.")
    return redirect(url)


@require_GET
@login_required
def session_detail(request: HtmxHttpRequest, tenant: str) -> HttpResponse:
    """A session's runs in session order, with where each stands."""
    user = authenticated_user(request)
    tenant_obj = get_tenant_for_user(user, tenant)
    key = request.GET.get("key", "")
    runs = session_runs(tenant_id=tenant_obj.pk, session_key=key) if key and "\x00" not in key else []
    waiting = [r for r in runs if r.session_state == SessionState.WAITING]
    rows = [{"run": r, "place": waiting.index(r) + 1 if r in waiting else None} for r in runs]
    return render(request, "runs/session.html", {"tenant": tenant_obj, "key": key, "rows": rows})


@require_GET
@login_required
def lease_board(request: HtmxHttpRequest) -> HttpResponse:
    """Who owns which record, who waits for it and why; filtered by tenant and key prefix."""
    user = authenticated_user(request)
    filters = {name: request.GET.get(name, "").strip()[:200] for name in ("tenant", "prefix")}
    template = "runs/leases.html#lease-board" if request.htmx else "runs/leases.html"
    context = {
        "rows": selectors.ownership_board(user, **filters),
        "caps": selectors.board_caps(user, tenant=filters["tenant"]),
        "waits": selectors.board_waits(user, tenant=filters["tenant"]),
        "filters": filters,
        "tenants": list(tenants_for_user(user).values_list("slug", flat=True)),
    }
    return render(request, template, context)
