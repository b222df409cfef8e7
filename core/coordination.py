"""Coordination threads: where a worker process that runs many steps at once does its reads and
writes of Runwarden's tables.

A worker on Celery's threads pool runs one step per thread, hundreds at once. If each thread
opened its own database connection, a process would hold one per slot (and PostgreSQL allows
100 by default). Instead its steps hand their short coordination work — a step's start and
end, a heartbeat, a ledger proposal and record, a checkpoint, a lock — to a few coordination
threads, each with one connection kept open: the connections a process holds are bounded by
``RUNWARDEN_COORDINATION_THREADS`` whatever its slot count, and a step that waits on a model or
a tool holds none. Elsewhere (a prefork or solo worker: one step per process at a time; the web
process) nothing is handed off: ``run`` calls the function right there. The embedded default
sets this up for its whole process, its one-at-a-time worker included.

A pool of fewer slots than ``RUNWARDEN_COORDINATION_THREADS`` gains nothing from the hand-off
(``Coordinator.slots_do_their_own``): each slot thread does its step's database work itself,
on a connection of its own, as a prefork worker's process does, and skips the two thread
switches a hand-off costs. Only what cannot run on the asking thread still goes to coordination
threads, as many as the slots leave of that number, so the bound holds: an ``async def``
body's calls (Django refuses database work on a thread running an event loop) and work done in
the background (``run_soon``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar

from django.db import close_old_connections, connections

from core import rawsql

T = TypeVar("T")

logger = logging.getLogger(__name__)

_here = threading.local()


def _coordinating() -> bool:
    return bool(getattr(_here, "coordinating", False))


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _done_right_here(coordinator: Coordinator | None) -> bool:
    """Whether database work asked for on this thread is done right here, not handed off: with
    no coordination threads; on one of them (a hand-off from one to another could leave every
    thread waiting on another); on a small pool's slot (``slots_do_their_own``), unless the
    thread runs an event loop."""
    if coordinator is None or _coordinating():
        return True
    return coordinator.slots_do_their_own and not _in_event_loop()


def _enter_thread() -> None:
    _here.coordinating = True


def _in_context(context: contextvars.Context, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    close_old_connections()  # a connection broken by an outage is replaced, not reused
    # Each thread keeps its connection for the worker's life: the step chain's statements are
    # prepared on it once, as on a prefork worker's.
    with rawsql.prepared_statements():
        return context.run(fn, *args, **kwargs)


class Coordinator:
    def __init__(self, threads: int, *, slots_do_their_own: bool = False) -> None:
        self.threads = threads
        self.slots_do_their_own = slots_do_their_own  # a small pool's (module docstring)
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="coordination", initializer=_enter_thread
        )

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a coordination thread, with the caller's log context;
        waits for it. Right here where this thread does its own (``_done_right_here``)."""
        if _done_right_here(self):
            return fn(*args, **kwargs)
        context = contextvars.copy_context()
        return self._pool.submit(_in_context, context, fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., object], /, *args: Any) -> Future[object] | None:
        """``fn(*args)`` on a coordination thread, with the caller's log context, not waited for:
        its Future (a failure is logged as it ends). None once the threads are stopped."""
        try:
            future = self._pool.submit(_in_context, contextvars.copy_context(), fn, *args)
        except RuntimeError:  # the pool is shut down
            return None
        future.add_done_callback(_log_failure)
        return future

    def close(self) -> None:
        """Close each thread's connection and stop the threads (a test's end, a worker's)."""
        barrier = threading.Barrier(self.threads)

        def close_here() -> None:
            with suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=5)  # one call per thread: each waits for the others
            connections.close_all()

        for closing in [self._pool.submit(close_here) for _ in range(self.threads)]:
            closing.result()
        self._pool.shutdown()

    async def call_async(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``call`` for a coroutine: the event loop goes on while the coordination thread works."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(_in_context, context, fn, *args, **kwargs))


def _log_failure(future: Future[object]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        logger.warning("coordination work done in the background failed", exc_info=exc)


_coordinator: Coordinator | None = None


def run_soon(fn: Callable[..., object], /, *args: Any) -> Future[object] | None:
    """``fn(*args)`` where this process does its database work, without waiting for it: on a
    coordination thread when there are some (work off a step's path), its Future; else, or once
    they are stopped, right here (None)."""
    if _coordinator is not None and (future := _coordinator.submit(fn, *args)) is not None:
        return future
    fn(*args)
    return None


def coordinate_on_threads(threads: int, *, slots: int | None = None) -> Coordinator:
    """From now on this process does its database work on at most ``threads`` connections: on
    that many coordination threads (a worker on the threads pool calls it as it starts, with
    its pool's ``slots``), or, for fewer slots, on each slot's own and on the threads left over
    (``Coordinator.slots_do_their_own``)."""
    global _coordinator
    if slots is not None and slots < threads:
        _coordinator = Coordinator(threads - slots, slots_do_their_own=True)
    else:
        _coordinator = Coordinator(threads)
    return _coordinator


def coordinate_in_place() -> None:
    """Back to doing database work right where it is asked for; the threads are closed, after
    the work handed to them before they stop (``before_threads_stop``)."""
    global _coordinator
    if _coordinator is not None:
        for hand_over in _before_stop:
            hand_over()
    coordinator, _coordinator = _coordinator, None
    if coordinator is not None:
        coordinator.close()


_before_stop: list[Callable[[], object]] = []


def before_threads_stop(hand_over: Callable[[], object]) -> None:
    """Call ``hand_over`` as this process's coordination threads are about to stop, while they
    still take work (``run_soon``): what it hands them is done before they close."""
    _before_stop.append(hand_over)


def current() -> Coordinator | None:
    """This process's coordination threads (where an async body's calls go), or None when it
    has none."""
    return _coordinator


def steps_do_their_own() -> bool:
    """Whether a step's start and end, and its plain body's calls, run on the step's own thread
    and connection, as on a prefork worker: without coordination threads, and in a small pool
    (``Coordinator.slots_do_their_own``; an async body's calls go to its threads even there)."""
    return _coordinator is None or _coordinator.slots_do_their_own


def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` where this process does its database work, and its result."""
    if _coordinator is None:
        return fn(*args, **kwargs)
    return _coordinator.call(fn, *args, **kwargs)
