"""Python's cyclic garbage collector in Runwarden's long-running processes.

A full (oldest-generation) collection walks every object the process holds — Django, its apps,
the workflow registry: measured here, 58–97 ms in a web process, during which no thread runs
Python. Under load every request in flight waits for it; it was the slow tail of ``POST
/api/v1/runs`` (p99 two to three times its median). ``settle_after_startup`` moves everything a
process loaded at start into the collector's permanent generation (``gc.freeze``: those
objects live for the process anyway), so a full collection walks only what came since, and
collects the youngest generation less often (each of its collections also costs a walk).
"""

from __future__ import annotations

import gc

# The youngest generation is collected after this many more allocations than deallocations
# (Python's default 700: several collections per request under load). Not much more: a
# request's garbage is cyclic, and a youngest collection of 20,000 objects took 10–18 ms here.
# The older generations' thresholds are Python's own.
YOUNGEST_THRESHOLD = 2_000


def settle_after_startup() -> None:
    """Call once a process has loaded what it needs (and, in a forking server, before it forks)."""
    gc.collect()  # startup's own garbage is not kept for the life of the process
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNGEST_THRESHOLD, middle, oldest)
