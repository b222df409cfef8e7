"""The runs section of the overview: work in flight, work waiting, and the last hour as
per-minute series (runs finished, runs started), computed from Runwarden's own tables with
indexed range scans (runs by tenant and created_at / finished_at)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, F
from django.db.models.functions import TruncMinute

from core import tallies
from core.models import Event
from core.overview import percentile
from runs.models import Run, SessionState, SideEffect, Step, StepStatus

MINUTES = 60
CHART_WIDTH, CHART_HEIGHT = 600, 120


def runs_overview(tenant_ids: Sequence[int], slugs: dict[int, str], now: datetime) -> dict[str, Any]:
    since = now - timedelta(minutes=MINUTES)
    steps = Step.objects.filter(tenant_id__in=tenant_ids)
    inflight = list(
        steps.filter(status__in=[StepStatus.LEASED, StepStatus.RUNNING])
        .values("lane", workflow=F("run__workflow"))
        .annotate(n=Count("id"))
        .order_by("lane", "workflow")
    )
    ready = dict(
        steps.filter(status=StepStatus.READY).values_list("tenant_id").annotate(n=Count("id")).order_by()
    )
    finished = (
        Run.objects.filter(tenant_id__in=tenant_ids, finished_at__gte=since)
        .annotate(minute=TruncMinute("finished_at"))
        .values("minute", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    per_minute: dict[datetime, Counter[str]] = defaultdict(Counter)
    for row in finished:
        per_minute[row["minute"]][row["status"]] += row["n"]
    started = dict(
        Run.objects.filter(tenant_id__in=tenant_ids, created_at__gte=since)
        .annotate(minute=TruncMinute("created_at"))
        .values_list("minute")
        .annotate(n=Count("id"))
        .order_by()
    )
    latencies: dict[str, list[float]] = defaultdict(list)
    for kind, proposed, committed in (
        SideEffect.objects.filter(tenant_id__in=tenant_ids, committed_at__gte=since)
        .values_list("kind", "proposed_at", "committed_at")
        .order_by("-committed_at")[:5000]
    ):
        if committed is not None and proposed is not None:
            latencies[kind].append((committed - proposed).total_seconds())
    events = dict(
        Event.objects.filter(
            tenant_id__in=tenant_ids,
            created_at__gte=since,
            verb__in=[
                "step_lease_expired",
                "stale_token_write",
                "locks_preempted",
                "duplicate_trigger_payload",
                "deadlock_detected",
            ],
        )
        .values_list("verb")
        .annotate(n=Count("id"))
        .order_by()
    )
    counted = tallies.tallies_since(tenant_ids, since)
    minutes = [_minute(now) - timedelta(minutes=MINUTES - 1 - i) for i in range(MINUTES)]
    series = [(m, per_minute.get(m, Counter()), started.get(m, 0)) for m in minutes]
    return {
        "inflight": inflight,
        "inflight_total": sum(r["n"] for r in inflight),
        "ready": [{"tenant": slugs[t], "n": ready.get(t, 0)} for t in tenant_ids],
        "ready_total": sum(ready.values()),
        "sessions_waiting": Run.objects.filter(
            tenant_id__in=tenant_ids, session_state=SessionState.WAITING
        ).count(),
        "finished_last_hour": sum(sum(c.values()) for c in per_minute.values()),
        "finished_last_minute": sum(per_minute.get(minutes[-1], Counter()).values()),
        "effect_latency": [
            {"kind": kind, "n": len(v), "p50": percentile(v, 0.5), "p95": percentile(v, 0.95)}
            for kind, v in sorted(latencies.items())
        ],
        "lease_expirations": events.get("step_lease_expired", 0),
        "stale_writes": events.get("stale_token_write", 0),
        "preemptions": events.get("locks_preempted", 0),
        "deadlocks": events.get("deadlock_detected", 0),
        "duplicate_triggers": events.get("duplicate_trigger_payload", 0),
        "lock_wait": tallies.lock_wait_summary(counted),
        "lock_conflicts": counted.get(tallies.LOCK_CONFLICTS, 0),
        "duplicates_suppressed": counted.get(tallies.DUPLICATES_SUPPRESSED, 0),
        "retries_blocked": counted.get(tallies.RETRIES_BLOCKED_BY_LEASE, 0),
        "chart": _chart(series),
    }


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _chart(series: list[tuple[datetime, Counter[str], int]]) -> dict[str, Any]:
    """Runs finished per minute as stacked bars (succeeded below, anything else above) and runs
    started per minute as a line, scaled into CHART_WIDTH x CHART_HEIGHT."""
    peak = max([sum(c.values()) for _, c, _ in series] + [s for _, _, s in series] + [1])
    step = CHART_WIDTH / len(series)
    bars, points = [], []
    for i, (minute, counts, started) in enumerate(series):
        ok = counts.get("succeeded", 0)
        other = sum(counts.values()) - ok
        x = round(i * step + 1, 1)
        h_ok = ok / peak * (CHART_HEIGHT - 10)
        h_other = other / peak * (CHART_HEIGHT - 10)
        bars.append(
            {
                "x": x,
                "w": round(step - 2, 1),
                "ok_y": round(CHART_HEIGHT - h_ok, 1),
                "ok_h": round(h_ok, 1),
                "other_y": round(CHART_HEIGHT - h_ok - h_other, 1),
                "other_h": round(h_other, 1),
                "label": f"{minute:%H:%M} UTC: {ok} succeeded, {other} other, {started} started",
            }
        )
        points.append(
            f"{round(x + step / 2, 1)},{round(CHART_HEIGHT - started / peak * (CHART_HEIGHT - 10), 1)}"
        )
    return {
        "bars": bars,
        "line": " ".join(points),
        "peak": peak,
        # The axes: runs per minute from the peak (drawn 10 units below the top) down to 0, and
        # the minutes of the hour, the first, the middle and the last (UTC).
        "y_ticks": [peak, 0],
        "x_ticks": [series[0][0], series[len(series) // 2][0], series[-1][0]],
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "first": series[0][0],
        "last": series[-1][0],
    }
