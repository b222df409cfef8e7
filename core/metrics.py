"""Prometheus metrics (names from DESIGN.md).

Counters and histograms count what happens in each process. With PROMETHEUS_MULTIPROC_DIR set
(a directory every process of the host shares; `make run` and the Procfile set it), each
process writes them there and /metrics adds up every process's — the workers' lock waits,
retries and effect latencies included. Gauges are read from the database when /metrics is
scraped, so they are right whichever process changed the state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

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


GaugeSource = Callable[[], Iterable[tuple[dict[str, str], float]]]
_gauges: dict[str, tuple[str, list[str], GaugeSource]] = {}


def gauge_register(name: str, documentation: str, labels: list[str], source: GaugeSource) -> None:
    """A gauge read from the database at scrape time (apps register theirs in AppConfig.ready)."""
    _gauges[name] = (documentation, labels, source)


class _DatabaseGauges:
    """A prometheus collector that asks each registered source for its current samples."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (documentation, labels, source) in _gauges.items():
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for label_values, value in source():
                family.add_metric([label_values[label] for label in labels], value)
            yield family


REGISTRY.register(_DatabaseGauges())


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_DatabaseGauges())
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
