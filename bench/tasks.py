"""The raw-Celery baseline of ``manage.py bench``: the same broker and worker processes as
Runwarden's steps, no coordination at all."""

from __future__ import annotations

import redis
from celery import shared_task
from django.conf import settings


@shared_task(name="bench.noop", ignore_result=True)
def bench_noop_task(*, counter_key: str) -> None:
    """The raw-Celery baseline of ``manage.py bench``: a no-op that counts itself in Redis."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.incr(counter_key)
    finally:
        client.close()
