"""One Redis connection pool per process, for wake-ups and worker announcements.

redis-py resets a pool that was inherited across ``fork()``, so Celery's prefork children
get their own connections.
"""

from __future__ import annotations

import redis
from django.conf import settings

_client: redis.Redis | None = None


def get_redis() -> redis.Redis | None:
    """The process's Redis client, or None in the embedded default (no REDIS_URL)."""
    global _client
    if not settings.REDIS_URL:
        return None
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, health_check_interval=30)
    return _client
