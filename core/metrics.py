"""Prometheus metrics (names from DESIGN.md).

Counters and histograms count what happens in this process; gauges are read from the
database when /metrics is scraped, so they are right whichever process changed the state.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LOCK_WAIT_SECONDS = Histogram("runwarden_lock_wait_seconds", "Time spent acquiring entity locks")
LOCK_CONFLICTS = Counter("runwarden_lock_conflicts_total", "Entity lock acquisitions refused because held")
DUPLICATES_SUPPRESSED = Counter(
    "runwarden_duplicates_suppressed_total",
    "Duplicates answered from a record instead of acting again",
    ["kind"],
)
RETRIES_BLOCKED_BY_LEASE = Counter(
    "runwarden_retries_blocked_by_lease_total",
    "Retries not started because a live lease still owned the step",
)
EFFECT_LATENCY_SECONDS = Histogram("runwarden_effect_latency_seconds", "Side-effect execution time", ["kind"])
APPROVAL_DECISIONS = Counter("runwarden_approval_decisions_total", "Approval decisions", ["outcome"])
