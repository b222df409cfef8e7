"""Real threads against the real database, started together behind a barrier; and the means
to make PostgreSQL really abort a transaction (a deadlock) and fail a chosen query with it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from django.db import connections, transaction

from core.models import Tenant


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
