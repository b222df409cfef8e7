"""Prometheus metrics (names from DESIGN.md).

Counters and histograms count what happens in each process. With PROMETHEUS_MULTIPROC_DIR set
(a directory every process of the host shares; `make run` and the Procfile set it), each
process writes them there and /metrics adds up every process's — the workers' lock waits,
retries and effect latencies included. Gauges are read from the database when /metrics is
scraped, so they are right whichever process changed the state.

Every metric is on /metrics from a process's start, in both modes: a labelled counter has a
sample at 0 for each label value it can take (below, beside its definition), and a gauge for
each label set its app declares known (``gauge_register(..., known=...)``), so an alert can tell
"zero" from "missing". A labelled metric whose values are open (an effect's kind is whatever a
workflow names) is listed without samples until its first observation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

LOCK_WAIT_SECONDS = Histogram(
    "runwarden_lock_wait_seconds",
    "How long an admitted step with entity locks waited, from ready to admission",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
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

# The label values each labelled counter can take, each at 0 from the start. In multiprocess mode
# a child that was never created is in no process's file, so the name would be missing entirely.
DUPLICATE_KINDS = (
    "effect",  # an effect answered from the ledger (runs/ledger.py, runs/context.py)
    "trigger",  # a trigger delivered again, answered with its run (runs/services.py)
)
APPROVAL_OUTCOMES = (
    "approve",  # a decision that settled the request (approvals/services/decisions.py)
    "reject",
    "request_changes",
    "vote",  # one approval of several required
    "timeout_reject",  # the timeout fallback of a step's ApprovalPolicy.on_timeout
    "timeout_escalate",
    "timeout_auto_approve",
)


def _at_zero(metric: Any, label: str, values: Iterable[str]) -> None:
    for value in values:
        metric.labels(**{label: value})


_at_zero(DUPLICATES_SUPPRESSED, "kind", DUPLICATE_KINDS)
_at_zero(APPROVAL_DECISIONS, "outcome", APPROVAL_OUTCOMES)
# Every metric this module counts: in multiprocess mode render() lists each one, even one no
# process's file holds yet (the files hold only samples).
_DEFINED = (
    LOCK_WAIT_SECONDS,
    LOCK_CONFLICTS,
    DUPLICATES_SUPPRESSED,
    RETRIES_BLOCKED_BY_LEASE,
    EFFECT_LATENCY_SECONDS,
    APPROVAL_DECISIONS,
)


GaugeSource = Callable[[], Iterable[tuple[dict[str, str], float]]]
KnownLabels = Callable[[], Iterable[dict[str, str]]]
_gauges: dict[str, tuple[str, list[str], GaugeSource, KnownLabels | None]] = {}


def gauge_register(
    name: str, documentation: str, labels: list[str], source: GaugeSource, known: KnownLabels | None = None
) -> None:
    """A gauge read from the database at scrape time (apps register theirs in AppConfig.ready).
    ``source`` gives the label sets that have a value; ``known`` the ones shown at 0 otherwise."""
    _gauges[name] = (documentation, labels, source, known)


class _DatabaseGauges:
    """A prometheus collector that asks each registered source for its current samples."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (documentation, labels, source, known) in _gauges.items():
            values = {tuple(s[label] for label in labels): v for s, v in source()}
            for label_set in known() if known else ():
                values.setdefault(tuple(label_set[label] for label in labels), 0.0)
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for key in sorted(values):
                family.add_metric(list(key), values[key])
            yield family


class _EveryProcess:
    """Multiprocess mode: the counters of every process's file, then each metric defined here
    that no file holds yet (a labelled one never observed), listed with no sample as a single
    process lists it."""

    def collect(self) -> Iterator[Any]:
        seen = set()
        for family in multiprocess.MultiProcessCollector(None).collect():
            seen.add(family.name)
            yield family
        for metric in _DEFINED:
            for family in metric.describe():
                if family.name not in seen:
                    yield family


REGISTRY.register(_DatabaseGauges())


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        registry.register(_EveryProcess())
        registry.register(_DatabaseGauges())
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
