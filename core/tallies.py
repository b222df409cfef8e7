"""Per-tenant, per-minute tallies of coordination events, for the live overview.

Prometheus counters (core.metrics) are per process and platform-wide; the overview needs each
tenant's own figures for the last hour, summed over every process. Each call site that bumps
a counter also adds to a ``Tally`` row here, in the caller's transaction (a rolled-back
attempt counts nothing), with one ``INSERT ... ON CONFLICT DO UPDATE SET count = count + n``
per batch: concurrent writers add up exactly, without reading first.

Lock order: a row stays locked until its writer commits. A round's admission tallies (lock
waits, lock conflicts, retries blocked) are written under the admission lock, once per round;
a worker's own admission adds its tallies once it has committed, and the duplicate tallies are
single statements: neither holds anything else. So no two writers can wait on each other's
tally rows crosswise.

A worker's own admissions add their tallies once they have committed (``tally_add_on_commit``),
and a process writes those of all its admissions together: on one of its coordination threads
where it has some, gathered for ``WRITE_EVERY_SECONDS`` first (``_write_later``), so the step a
worker goes on with — a key's next holder, run by the same thread — never waits for the tally
row and its commit, and a process that admits a keyed step every few milliseconds writes its
tallies a few times a second, not once per admission. A worker that exits or is killed in
that moment, or a write that fails, loses them: they are a figure for the overview, not a
record (a process's coordination threads stopped on purpose write them first).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import connection, connections, transaction
from django.db.models import Sum
from django.utils import timezone

from core import coordination
from core.models import Tally

logger = logging.getLogger(__name__)

LOCK_CONFLICTS = "lock_conflicts"
DUPLICATES_SUPPRESSED = "duplicates_suppressed"
RETRIES_BLOCKED_BY_LEASE = "retries_blocked_by_lease"
# Lock waits are kept as a histogram: one tally per bucket (upper bound in seconds).
LOCK_WAIT_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2.5, 5, 15, 30, 60, 300, 900, 3600)
LOCK_WAIT_PREFIX = "lock_wait_le_"
KEEP_FOR = timedelta(days=2)


def lock_wait_bucket(seconds: float) -> str:
    index = bisect.bisect_left(LOCK_WAIT_BUCKETS, seconds)
    return LOCK_WAIT_PREFIX + (f"{LOCK_WAIT_BUCKETS[index]:g}" if index < len(LOCK_WAIT_BUCKETS) else "inf")


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def tally_add(
    counts: Iterable[tuple[int, str]] | Counter[tuple[int, str]], *, now: datetime | None = None
) -> None:
    """Add one (or, for a Counter, n) to each (tenant_id, name) for the current minute, in the
    caller's transaction."""
    totals = counts if isinstance(counts, Counter) else Counter(counts)
    if not totals:
        return
    minute = _minute(now or timezone.now())
    rows = sorted(totals.items())
    values = ", ".join(["(%s, %s, %s, %s)"] * len(rows))
    params: list[Any] = []
    for (tenant_id, name), n in rows:
        params += [tenant_id, connection.ops.adapt_datetimefield_value(minute), name, n]
    table = Tally._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (tenant_id, minute, name, count) VALUES {values} "
            f"ON CONFLICT (tenant_id, minute, name) DO UPDATE SET count = {table}.count + EXCLUDED.count",
            params,
        )


def tally_add_on_commit(counts: Counter[tuple[int, str]], *, now: datetime | None = None) -> None:
    """``tally_add`` once the caller's transaction commits (nothing for a rolled-back one),
    with the other tallies this process commits meanwhile (``_committed``). For a worker's own
    admissions: every keyed admission of a tenant adds to one row per minute, and written in
    the admitting transaction it stayed locked until that transaction committed, so a tenant's
    keyed admissions waited on each other there."""
    if not counts:
        return
    at = now or timezone.now()
    # Robust: a figure for the overview that could not be written never undoes the admission.
    transaction.on_commit(partial(_committed, Counter(counts), at), robust=True)


class _Unwritten:
    """This process's committed tallies not written yet, by (minute, tenant, name), whether a
    write is on its way (it takes every count added before it starts; those added after, it
    writes again once it is done: ``_written``), and the timer that starts it, while one waits
    (``_write_later``)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.counts: Counter[tuple[datetime, int, str]] = Counter()
        self.scheduled = False
        self.timer: threading.Timer | None = None


_unwritten = _Unwritten()


def _forget_in_child() -> None:
    """A process forked meanwhile starts with none of its parent's tallies, and no timer."""
    global _unwritten
    _unwritten = _Unwritten()


os.register_at_fork(after_in_child=_forget_in_child)


def _committed(counts: Counter[tuple[int, str]], at: datetime) -> None:
    with _unwritten.changed:
        for (tenant_id, name), n in counts.items():
            _unwritten.counts[(_minute(at), tenant_id, name)] += n
        if _unwritten.scheduled:
            return
        _unwritten.scheduled = True
    _write_later()


# How long a process with coordination threads gathers its committed tallies before it writes
# them. Written as each admission committed, one `keyed` run of `bench_peer` (210 keyed
# admissions) wrote 195 times, each its own transaction, often waiting for the row another
# process was writing: an eighth of the database's statement time in that workload. The
# overview reads them every few seconds.
WRITE_EVERY_SECONDS = 0.5


def _write_later() -> None:
    """Write the committed tallies ``WRITE_EVERY_SECONDS`` from now, with those committed
    meanwhile, where this process has coordination threads (a timer hands the write to one;
    the threads write what is still gathered before they stop: ``_write_before_threads_stop``);
    right away elsewhere (a prefork worker's process, the web process: on the committing
    thread, which has a connection of its own)."""
    if coordination.current() is None:
        _write_soon()
        return
    with _unwritten.changed:
        timer = _unwritten.timer = threading.Timer(WRITE_EVERY_SECONDS, _write_on_time)
    timer.daemon = True  # a process stopping does not wait for a figure
    timer.start()


def _timer_taken() -> bool:
    """Whether a timer was waiting to start the write, now taken off (by the timer itself, or
    by the threads stopping before it: whichever comes first starts the write, once)."""
    with _unwritten.changed:
        timer, _unwritten.timer = _unwritten.timer, None
    if timer is not None:
        timer.cancel()  # a no-op for the timer itself, running this
    return timer is not None


def _write_on_time() -> None:
    """The timer's end: the write handed to a coordination thread (right here if they stopped
    just now, the connection closed after)."""
    if not _timer_taken():
        return  # the threads' stop started it already
    try:
        _write_soon()
    except Exception:
        logger.warning("could not write this process's tallies for the overview", exc_info=True)
    finally:
        connections.close_all()  # opened only where written right here


def _write_before_threads_stop() -> None:
    """The coordination threads are stopping: what they gathered goes to them now, queued
    before they close (``coordination.coordinate_in_place``)."""
    if _timer_taken():
        _write_soon()


coordination.before_threads_stop(_write_before_threads_stop)


def _write_soon() -> None:
    try:
        future = coordination.run_soon(_write_unwritten)
    except BaseException:
        _written(failed=True)  # written right here, and it failed: the caller logs it
        raise
    if future is None:
        _written(failed=False)
    else:
        future.add_done_callback(
            lambda done: _written(failed=done.cancelled() or done.exception() is not None)
        )


def _write_unwritten() -> None:
    """Write every tally committed so far, one statement per minute they fall in."""
    with _unwritten.changed:
        taken, _unwritten.counts = _unwritten.counts, Counter()
    by_minute: dict[datetime, Counter[tuple[int, str]]] = {}
    for (minute, tenant_id, name), n in taken.items():
        by_minute.setdefault(minute, Counter())[(tenant_id, name)] += n
    for minute, counts in sorted(by_minute.items()):
        tally_add(counts, now=minute)


def _written(*, failed: bool) -> None:
    """A write has ended: write what was committed while it ran. After a failure (logged where
    it happened), what came meanwhile is dropped too rather than kept for a write that may fail
    the same way."""
    with _unwritten.changed:
        if failed and _unwritten.counts:
            logger.warning(
                "dropped %d tallies for the overview after a failed write", _unwritten.counts.total()
            )
            _unwritten.counts.clear()
        _unwritten.scheduled = bool(_unwritten.counts)
        again = _unwritten.scheduled
        if not again:
            _unwritten.changed.notify_all()
    if again:
        _write_later()


def tallies_written(timeout: float = 5.0) -> bool:
    """Wait until this process has written (or dropped) every tally committed so far; False if
    that took longer than ``timeout`` seconds (tests check with it)."""
    with _unwritten.changed:
        return _unwritten.changed.wait_for(lambda: not _unwritten.scheduled, timeout)


def tallies_since(tenant_ids: Sequence[int], since: datetime) -> Counter[str]:
    """Every tally of these tenants in the whole minutes since ``since``, summed by name."""
    rows = (
        Tally.objects.filter(tenant_id__in=tenant_ids, minute__gte=since)
        .values_list("name")
        .annotate(total=Sum("count"))
        .order_by()
    )
    return Counter(dict(rows))


def lock_wait_summary(totals: Counter[str]) -> dict[str, object]:
    """How many lock waits and the bucket bounds their p50 and p95 fall under ("≤ 0.5 s")."""
    counts = [totals.get(LOCK_WAIT_PREFIX + f"{b:g}", 0) for b in LOCK_WAIT_BUCKETS]
    counts.append(totals.get(LOCK_WAIT_PREFIX + "inf", 0))
    n = sum(counts)

    def bound(q: float) -> str:
        seen = 0
        for upper, count in zip([*LOCK_WAIT_BUCKETS, None], counts, strict=True):
            seen += count
            if seen >= q * n:
                return f"≤ {upper:g} s" if upper is not None else f"> {LOCK_WAIT_BUCKETS[-1]:g} s"
        return "—"

    return {"n": n, "p50": bound(0.5) if n else "—", "p95": bound(0.95) if n else "—"}


def tallies_prune(*, now: datetime | None = None) -> int:
    """Drop tallies older than KEEP_FOR (the overview reads the last hour)."""
    deleted, _ = Tally.objects.filter(minute__lt=(now or timezone.now()) - KEEP_FOR).delete()
    return deleted
