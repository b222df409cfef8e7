"""Real threads against the real database, started together behind a barrier; a sampler that
watches counts from another connection while they race (to show a cap was never exceeded);
and the means to make PostgreSQL really abort a transaction (a deadlock) and fail a chosen
query with it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from django.db import connections, transaction
from django.utils import timezone

from core.models import Tenant
from runs.dispatch import dispatch_round, load_room
from runs.executor import step_execute
from runs.models import Run, RunStatus


def run_concurrently(fn: Callable[[int], Any], n: int, timeout: float = 60.0) -> list[Any]:
    """Call ``fn(i)`` for i in 0..n-1 on n threads at once; each result, or the exception raised."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = fn(i)
        except BaseException as exc:  # returned to the test, which decides
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"a racing thread did not finish within {timeout}s")
    return results


@contextmanager
def held_meanwhile(sql: str, params: list[Any], timeout: float = 30.0) -> Iterator[None]:
    """Row locks another transaction holds while the block runs: ``sql`` (locking rows) runs on
    a connection of its own, in a transaction that stays open until the block ends."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic(), connections["default"].cursor() as cursor:
                cursor.execute(sql, params)
                holding.set()
                done.wait(timeout)
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(timeout), "the other transaction never took its locks"
        yield
    finally:
        done.set()
        thread.join(timeout)


def tally_rows_held_meanwhile(tenant_id: int, names: Iterable[str]) -> AbstractContextManager[None]:
    """``held_meanwhile`` for a tenant's tally rows of ``names``, this minute's and the next's (a
    minute may turn while the block runs): written with count 0 where missing, locked as any
    writer's upsert would lock them."""
    return held_meanwhile(
        "INSERT INTO core_tally (tenant_id, minute, name, count)"
        " SELECT %s, date_trunc('minute', now()) + g * interval '1 minute', n, 0"
        " FROM generate_series(0, 1) g, unnest(%s::text[]) n"
        " ON CONFLICT (tenant_id, minute, name) DO UPDATE SET count = core_tally.count",
        [tenant_id, sorted(names)],
    )


class Peaks(dict[str, int]):
    """The highest value each sampled count reached (``peaks["global"]``), and ``samples``: how
    many times the counts were taken. A count never sampled is a KeyError, never a silent 0."""

    samples: int = 0

    def __repr__(self) -> str:
        return f"Peaks({dict(self)!r}, samples={self.samples})"


@contextmanager
def sampled_peaks(
    measure: Callable[[], Mapping[str, int]], *, every: float, min_samples: int = 10
) -> Iterator[Peaks]:
    """Sample ``measure()`` on a thread of its own (its own database connection) every ``every``
    seconds until the block exits, keeping each count's peak: a test then asserts that no peak
    went over its cap, and that the work really pressed against it.

    It refuses to pass vacuously: on a normal exit it raises if the sampler failed, took fewer
    than ``min_samples`` samples, or never saw any count above zero (a cap never approached
    proves nothing)."""
    peaks = Peaks()
    failures: list[BaseException] = []
    stop = threading.Event()

    def sample() -> None:
        try:
            while not stop.is_set():
                for name, value in measure().items():
                    peaks[name] = max(peaks.get(name, 0), value)
                peaks.samples += 1
                stop.wait(every)
        except BaseException as exc:  # handed to the test on exit
            failures.append(exc)
        finally:
            connections.close_all()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join(10)
    if sampler.is_alive():
        raise TimeoutError("the sampler did not stop within 10s")
    if failures:
        raise AssertionError("the sampler failed") from failures[0]
    assert peaks.samples >= min_samples, f"too few samples to show anything: {peaks!r}"
    assert any(peaks.values()), f"the sampler never saw anything to count: {peaks!r}"


def held_per_scope() -> Mapping[str, int]:
    """What admission counts against each cap right now (``global``, ``tenant:<id>``, ...)."""
    return load_room(timezone.now()).held


def race_dispatchers(run_ids: list[str], dispatchers: int, *, timeout: float) -> list[Any]:
    """``dispatchers`` threads each dispatch rounds and run the steps they admitted (each holding
    its capacity a moment, so the threads really contend for it) until every run of ``run_ids``
    succeeded, or ``timeout`` - 30 s passed. Per thread: the steps it ran, or what it raised."""

    def dispatch_and_run(i: int) -> int:
        executed = 0
        deadline = time.monotonic() + timeout - 30
        while Run.objects.filter(pk__in=run_ids).exclude(status=RunStatus.SUCCEEDED).exists():
            if time.monotonic() > deadline:
                break
            for admission in dispatch_round():
                time.sleep(0.003)  # hold the capacity for a moment
                assert step_execute(step_id=admission.step_id, token=admission.token) == "succeeded"
                executed += 1
        return executed

    return run_concurrently(dispatch_and_run, dispatchers, timeout=timeout)


def failing_on(table: str, exc: BaseException) -> Callable[..., Any]:
    """A database wrapper (Django's execute_wrapper) under which any query of ``table`` fails."""

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if f'"{table}"' in sql:
            raise exc
        return execute(sql, params, many, context)

    return wrapper


def deadlock(first: Tenant, second: Tenant) -> list[Any]:
    """Two transactions lock the two rows in opposite orders; PostgreSQL aborts one."""
    both_hold_one = threading.Barrier(2, timeout=10)

    def lock(i: int) -> str:
        rows = (first.pk, second.pk) if i == 0 else (second.pk, first.pk)
        with transaction.atomic():
            list(Tenant.objects.select_for_update().filter(pk=rows[0]))
            both_hold_one.wait()
            list(Tenant.objects.select_for_update().filter(pk=rows[1]))
        return "committed"

    return run_concurrently(lock, 2)
