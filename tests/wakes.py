"""What the dispatcher would be woken by, read from the real Redis as it reads it."""

from __future__ import annotations

from core import wakeups
from core.redis_client import get_redis


def woken() -> bool:
    """Whether a wake-up is pending; it is taken, as the dispatcher would take it."""
    client = get_redis()
    assert client is not None, "this needs REDIS_URL"
    wakeups.wake_ups_delivered()  # sent unanswered on a connection of their own: arrived by now
    return bool(client.delete(wakeups.WAKE_KEY))


def wake_marks_cleared(*keys: str) -> None:
    """Delete these marks once every wake-up this process sent unanswered has arrived (one still
    on its way, an earlier test's start's, would set the wake mark again after)."""
    client = get_redis()
    assert client is not None, "this needs REDIS_URL"
    wakeups.wake_ups_delivered()
    client.delete(*keys)
