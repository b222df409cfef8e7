"""Celery tasks: thin interfaces to the dispatcher, the executor and the reaper."""

from __future__ import annotations

import logging

import redis
from celery import shared_task
from django.conf import settings
from django.db import transaction

from runs import dispatch, executor

logger = logging.getLogger(__name__)


@shared_task(name="runs.execute_step", acks_late=True, ignore_result=True)
def execute_step_task(*, step_id: int, token: int) -> str:
    return executor.step_execute(step_id=step_id, token=token)


@shared_task(name="runs.dispatch", ignore_result=True)
def dispatch_task() -> int:
    return dispatch.dispatch_until_idle()


@shared_task(name="runs.reap", ignore_result=True)
def reap_task() -> dict[str, int]:
    counts = executor.reap_expired_steps()
    if counts["retried"]:
        dispatch.dispatch_until_idle()
    return counts


def enqueue_step(step_id: int, token: int, lane: str) -> None:
    """Hand an admitted step to its lane's workers. If the broker is down the step's lease
    simply expires and the reaper makes it ready again: nothing is lost."""
    try:
        execute_step_task.apply_async(kwargs={"step_id": step_id, "token": token}, queue=lane)
    except Exception:
        logger.warning(
            "could not enqueue step %s; it will be reaped and re-dispatched", step_id, exc_info=True
        )


KICK_DEBOUNCE_MS = 100


def _kick_already_queued() -> bool:
    """At most one kick per 100 ms: a dispatch round admits everything ready when it runs, so a
    burst of commits needs one round, not one each (beat still runs one every second)."""
    if not settings.REDIS_URL:
        return False
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1)
    try:
        return not client.set("runwarden:dispatch-kick", "1", nx=True, px=KICK_DEBOUNCE_MS)
    finally:
        client.close()


def kick_dispatcher() -> None:
    """Ask for a dispatch round once the current transaction commits (beat runs them too)."""

    def kick() -> None:
        try:
            if _kick_already_queued():
                return
            dispatch_task.apply_async(queue="maintenance")
        except Exception:
            logger.warning("could not kick the dispatcher; beat will run it", exc_info=True)

    transaction.on_commit(kick)


@shared_task(name="runs.bench_noop", ignore_result=True)
def bench_noop_task(*, counter_key: str) -> None:
    """The raw-Celery baseline of ``manage.py bench``: a no-op that counts itself in Redis."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.incr(counter_key)
    finally:
        client.close()
