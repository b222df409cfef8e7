"""Live push: committed events go to the Channels group of their tenant.

The channel layer delivers at most once, so a push is a hint that carries the event id;
pages re-fetch their fragments when they notice a gap or a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from core.models import Event

logger = logging.getLogger(__name__)


def tenant_group(tenant_id: int) -> str:
    return f"tenant_{tenant_id}"


def user_group(user_id: int) -> str:
    return f"user_{user_id}"


class _PushLoop:
    """One event loop per process, on a daemon thread, that sends pushes to a Redis channel
    layer without blocking the caller. ``async_to_sync`` per push would start an event loop
    and open a Redis connection every time (the layer pools connections per loop): that was
    a large share of a worker's CPU per step."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="live-push", daemon=True).start()

    def submit(self, group: str, message: dict[str, object], layer: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(layer.group_send(group, message), self.loop)
        future.add_done_callback(_log_failure(group))


def _log_failure(group: str) -> Any:
    def done(future: Any) -> None:
        if future.exception() is not None:
            logger.warning("live push to %s failed: %s", group, future.exception())

    return done


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
            async_to_sync(layer.group_send)(group, message)
    except Exception:
        logger.warning("live push to %s failed", group, exc_info=True)


def publish_event(event: Event) -> None:
    group_send(
        tenant_group(event.tenant_id),
        {
            "type": "event.push",
            "event_id": event.pk,
            "tenant_id": event.tenant_id,
            "subject": event.subject,
            "verb": event.verb,
        },
    )
