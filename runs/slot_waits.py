"""Governed calls waiting for a slot under their tool's cap, woken as a slot is given back.

A call that finds its tool's cap full waits and looks again (``runs.context``). Looking again
only after a backoff left a freed slot idle for up to a quarter of a second: measured with 200
calls of 20 ms under a cap of 4 (``make bench``'s ``tool_calls``), the tool ran at under a third
of what its cap allows. Now a call of this process that gives its slot back wakes, at once,
the call of this process that has waited longest for that tool; it takes the slot if the cap
allows (a call elsewhere may have taken it first: then it waits again). Calls waiting in other
worker processes still find a slot by looking again after their backoff: the wake is a
shortcut, never the only way to a slot.

Sync bodies wait on a thread, async bodies on their event loop; both are woken from whatever
thread gave the slot back (a coordination thread, as its transaction commits).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import Callable
from contextlib import suppress

_lock = threading.Lock()
_released: Counter[str] = Counter()  # slots of each tool given back by this process so far
_waiting: dict[str, deque[Callable[[], None]]] = {}  # each tool's waiters' wakes, oldest first


def slots_released_so_far(tool: str) -> int:
    """Read before a look for a slot; handed to the wait after a failed look, so that a slot
    given back in between is not waited for."""
    with _lock:
        return _released[tool]


def slot_released(tool: str) -> None:
    """A call of this process gave back its slot under ``tool``'s caps: wake the call of this
    process waiting longest for one."""
    with _lock:
        _released[tool] += 1
        waiters = _waiting.get(tool)
        wake = waiters.popleft() if waiters else None
    if wake is not None:
        wake()


def slot_wait(tool: str, seen: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for a slot of ``tool`` to be given back here, unless one
    was since ``seen`` (``slots_released_so_far``)."""
    woken = threading.Event()
    if _queued(tool, seen, woken.set):
        try:
            woken.wait(timeout)
        finally:
            _dequeue(tool, woken.set)


async def slot_wait_async(tool: str, seen: int, timeout: float) -> None:
    """``slot_wait`` for an async body: its event loop goes on meanwhile."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not woken.done():
            woken.set_result(None)

    def wake() -> None:
        with suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(resolve)

    if _queued(tool, seen, wake):
        try:
            with suppress(TimeoutError):  # a wait that ran its length: the caller looks again
                async with asyncio.timeout(timeout):
                    await woken
        finally:
            _dequeue(tool, wake)


def _queued(tool: str, seen: int, wake: Callable[[], None]) -> bool:
    """Queue ``wake`` for the next slot of ``tool`` given back; False (not queued) where one
    was given back since ``seen``: look again at once."""
    with _lock:
        if _released[tool] != seen:
            return False
        _waiting.setdefault(tool, deque()).append(wake)
        return True


def _dequeue(tool: str, wake: Callable[[], None]) -> None:
    with _lock:
        waiters = _waiting.get(tool)
        if waiters is not None:
            with suppress(ValueError):  # woken: taken off the queue already
                waiters.remove(wake)
            if not waiters:
                del _waiting[tool]
