"""What the dispatcher would be woken by, read from the real Redis as it reads it."""

from __future__ import annotations

from core import wakeups
from core.redis_client import get_redis


def woken() -> bool:
    """Whether a wake-up is pending; it is taken, as the dispatcher would take it."""
    client = get_redis()
    assert client is not None, "this needs REDIS_URL"
    return bool(client.delete(wakeups.WAKE_KEY))
