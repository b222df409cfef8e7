"""Reads of the runs app: runs for a user, run detail, live leases."""

from __future__ import annotations

import re
from typing import Any

from django.db.models import Count, QuerySet

from core.leases import live_leases_filter
from core.models import Lease, User
from core.selectors import AnyUser, scope_to_user
from runs.models import Run, SideEffect, Step
from runs.sessions import session_summary


def runs_for_user(
    user: AnyUser,
    *,
    status: str = "",
    workflow: str = "",
    correlation_id: str = "",
    tenant: str = "",
    session_key: str = "",
) -> QuerySet[Run]:
    runs = scope_to_user(Run.objects.select_related("tenant"), user).distinct()
    if status:
        runs = runs.filter(status=status)
    if workflow:
        runs = runs.filter(workflow=workflow)
    if correlation_id:
        runs = runs.filter(correlation_id=correlation_id)
    if tenant:
        runs = runs.filter(tenant__slug=tenant)
    if session_key:
        runs = runs.filter(session_key=session_key)
    return runs.order_by("-id")


CURSOR_SHAPE = re.compile(r"run_[0-9A-Za-z]{1,60}")


def run_page(runs: QuerySet[Run], *, cursor: str = "", limit: int = 50) -> tuple[list[Run], str | None]:
    """Keyset pagination on the (time-sortable) run id, newest first. A cursor that is not a
    run id is a ValueError."""
    if cursor and not CURSOR_SHAPE.fullmatch(cursor):
        raise ValueError("the cursor is not one this list handed out")
    if cursor:
        runs = runs.filter(id__lt=cursor)
    page = list(runs[: limit + 1])
    next_cursor = page[limit - 1].id if len(page) > limit else None
    return page[:limit], next_cursor


def run_summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "tenant": run.tenant.slug,
        "workflow": run.workflow,
        "status": run.status,
        "actor": run.actor,
        "correlation_id": run.correlation_id,
        "trigger_event_id": run.trigger_event_id,
        "workflow_version": run.workflow_version,
        "environment": run.environment,
        "connections": {
            provider: str(bound.get("name", "")) for provider, bound in (run.connections or {}).items()
        },
        "session": session_summary(run),
        "replay_of": run.replay_of_id,
        "retries": run.retries,
        "compensation": run.compensation,
        "input": run.input,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


def step_detail(step: Step) -> dict[str, Any]:
    return {
        "key": step.key,
        "position": step.position,
        "lane": step.lane,
        "tool": step.tool,
        "status": step.status,
        "attempt": step.attempt,
        "lock_keys": step.lock_keys,
        "output": step.output,
        "error": step.error,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
    }


def effect_detail(effect: SideEffect) -> dict[str, Any]:
    return {
        "kind": effect.kind,
        "status": effect.status,
        "idempotency_key": effect.idempotency_key,
        "external_ref": effect.external_ref,
        "attempts": effect.attempts,
        "proposed_at": effect.proposed_at,
        "committed_at": effect.committed_at,
        "context": effect.context,
    }


def lease_detail(lease: Lease) -> dict[str, Any]:
    return {
        "key": lease.key,
        "tenant": lease.tenant.slug,
        "holder": lease.holder,
        "token": lease.token,
        "run_id": lease.metadata.get("run_id"),
        "acquired_at": lease.acquired_at,
        "renewed_at": lease.renewed_at,
        "expires_at": lease.expires_at,
    }


def run_detail(run: Run) -> dict[str, Any]:
    steps = list(Step.objects.filter(run=run).order_by("position"))
    step_keys = [f"step:{step.pk}" for step in steps]
    lock_keys = [key for step in steps for key in step.lock_keys]
    leases = (
        Lease.objects.filter(live_leases_filter(), tenant_id=run.tenant_id, key__in=step_keys + lock_keys)
        .filter(metadata__run_id=run.id)
        .select_related("tenant")
        .order_by("key")
    )
    return {
        **run_summary(run),
        "steps": [step_detail(step) for step in steps],
        "effects": [
            effect_detail(e) for e in SideEffect.objects.filter(run=run).order_by("proposed_at", "id")
        ],
        "leases": [lease_detail(lease) for lease in leases],
    }


def live_leases_for_user(user: User) -> QuerySet[Lease]:
    return (
        scope_to_user(Lease.objects.filter(live_leases_filter()), user)
        .select_related("tenant")
        .distinct()
        .order_by("tenant__slug", "key")
    )


def queue_depth_samples() -> list[tuple[dict[str, str], float]]:
    """Ready steps waiting for admission, by tenant and lane."""
    rows = (
        Step.objects.filter(status="ready")
        .values("tenant__slug", "lane")
        .annotate(n=Count("id"))
        .order_by("tenant__slug", "lane")
    )
    return [({"tenant": r["tenant__slug"], "lane": r["lane"]}, r["n"]) for r in rows]


def inflight_samples() -> list[tuple[dict[str, str], float]]:
    """Admitted steps (leased or running), by workflow."""
    rows = (
        Step.objects.filter(status__in=["leased", "running"])
        .values("run__workflow")
        .annotate(n=Count("id"))
        .order_by("run__workflow")
    )
    return [({"workflow": r["run__workflow"]}, r["n"]) for r in rows]
