"""Live push: committed events go to the Channels group of their tenant.

The channel layer delivers at most once, so a push is a hint that carries the event id;
pages re-fetch their fragments when they notice a gap or a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from core.models import Event

logger = logging.getLogger(__name__)


def tenant_group(tenant_id: int) -> str:
    return f"tenant_{tenant_id}"


def user_group(user_id: int) -> str:
    return f"user_{user_id}"


# At most one layer message per group per interval: pushes that come faster (a busy worker
# records an event per step) travel together in one ``live.batch``. An idle console still
# gets each push at once.
PUSH_INTERVAL_SECONDS = 0.05
SEND_TIMEOUT_SECONDS = 5.0


class _PushLoop:
    """One event loop per process, on a daemon thread, that sends pushes to a Redis channel
    layer without blocking the caller. ``async_to_sync`` per push would start an event loop
    and open a Redis connection every time (the layer pools connections per loop): that was
    a large share of a worker's CPU per step. A send per push was still most of what is left
    of it, hence the batches."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.lock = threading.Lock()
        self.pending: dict[str, list[dict[str, object]]] = {}  # per group, not yet handed to the loop
        self.last_sent: dict[str, float] = {}  # on the loop only
        self.in_flight: dict[str, asyncio.Task[None]] = {}  # on the loop only
        threading.Thread(target=self.loop.run_forever, name="live-push", daemon=True).start()

    def submit(self, group: str, message: dict[str, object], layer: Any) -> None:
        with self.lock:
            queued = self.pending.get(group)
            if queued is not None:  # a send of this group is already scheduled: it takes this too
                queued.append(message)
                return
            self.pending[group] = [message]
        self.loop.call_soon_threadsafe(self._schedule, group, layer)

    def _schedule(self, group: str, layer: Any) -> None:
        wait = self.last_sent.get(group, -PUSH_INTERVAL_SECONDS) + PUSH_INTERVAL_SECONDS - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self._send, group, layer)
        else:
            self._send(group, layer)

    def _send(self, group: str, layer: Any) -> None:
        with self.lock:
            messages = self.pending.pop(group, [])
        self.last_sent[group] = self.loop.time()
        if not messages:
            return
        message = messages[0] if len(messages) == 1 else {"type": "live.batch", "messages": messages}
        message = {**message, "group": group}  # the receiving web process fans out by group
        task = self.loop.create_task(_deliver(layer, group, message, self.in_flight.get(group)))
        self.in_flight[group] = task
        task.add_done_callback(partial(self._sent, group))

    def _sent(self, group: str, task: asyncio.Task[None]) -> None:
        if self.in_flight.get(group) is task:
            del self.in_flight[group]
        if not task.cancelled() and task.exception() is not None:
            logger.warning("live push to %s failed: %s", group, task.exception())


async def _deliver(
    layer: Any, group: str, message: dict[str, object], before: asyncio.Task[None] | None
) -> None:
    """Send after the group's previous send is done, so a group's pushes keep their order; a
    send that hangs is given up after a while, so it cannot hold back the group's next ones."""
    if before is not None:
        await asyncio.wait([before])
    await asyncio.wait_for(layer.group_send(group, message), SEND_TIMEOUT_SECONDS)


_push_loop: _PushLoop | None = None
_push_loop_lock = threading.Lock()


def _loop_for_this_process() -> _PushLoop:
    global _push_loop
    with _push_loop_lock:
        if _push_loop is None or _push_loop.pid != os.getpid():  # a forked child starts its own
            _push_loop = _PushLoop()
        return _push_loop


def group_send(group: str, message: dict[str, object]) -> None:
    """Send to a Channels group; a failing layer is logged, never raised (pushes are hints)."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        if type(layer).__name__ == "RedisChannelLayer":
            _loop_for_this_process().submit(group, message, layer)
        else:  # the in-memory layer (embedded default, tests) is used from the caller's loop
            async_to_sync(layer.group_send)(group, {**message, "group": group})
    except Exception:
        logger.warning("live push to %s failed", group, exc_info=True)


def publish_event(event: Event) -> None:
    """Called once the event's transaction has committed (an event listener): the push carries
    that moment (``committed_at``, Unix seconds on the writer's clock), so a client on the same
    clock can tell how late a push reached it (``make bench``'s push latency)."""
    group_send(
        tenant_group(event.tenant_id),
        {
            "type": "event.push",
            "event_id": event.pk,
            "tenant_id": event.tenant_id,
            "subject": event.subject,
            "verb": event.verb,
            "committed_at": f"{time.time():.6f}",
        },
    )
