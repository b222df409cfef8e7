"""Celery tasks: thin interfaces to the executor (steps run on lane queues) and the bench."""

from __future__ import annotations

import redis
from celery import shared_task
from django.conf import settings
from django.db import close_old_connections

from core.workers import local_queues
from runs import executor
from runs.queueing import EXECUTE_STEP_TASK


@shared_task(name=EXECUTE_STEP_TASK, acks_late=True, ignore_result=True)
def execute_step_task(*, step_id: int, token: int) -> str:
    close_old_connections()  # connections are kept across tasks: drop a broken one first
    # Where caps and lanes allow, the worker goes straight on with the run's next step.
    return executor.step_execute(step_id=step_id, token=token, lanes=local_queues())


@shared_task(name="runs.bench_noop", ignore_result=True)
def bench_noop_task(*, counter_key: str) -> None:
    """The raw-Celery baseline of ``manage.py bench``: a no-op that counts itself in Redis."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.incr(counter_key)
    finally:
        client.close()
