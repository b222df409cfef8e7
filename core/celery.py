"""The Celery app. Workers: ``celery -A core worker -Q <queues>``; beat: ``celery -A core beat``."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutting_down

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings")

logger = logging.getLogger(__name__)


def make_app(*, set_as_current: bool = True) -> Celery:
    """The app, configured; the embedded default makes a second one for its second worker."""
    made = Celery("runwarden", set_as_current=set_as_current)
    made.config_from_object("django.conf:settings", namespace="CELERY")
    made.autodiscover_tasks()
    # Celery's Django fixup closes every database connection before and after each task unless
    # DB_REUSE_MAX is set: that cost two extra transactions (connect, SET TIME ZONE) per step.
    # Workers keep their connections (WORKER_DB_CONN_MAX_AGE); Django's close_old_connections,
    # called by the step task, still drops a broken or obsolete one.
    made.conf["CELERY_DB_REUSE_MAX"] = int(os.environ.get("CELERY_DB_REUSE_MAX", "1000"))
    return made


app = make_app()


@setup_logging.connect
def _django_logging(**kwargs: object) -> None:
    """Workers and beat log as the web does (JSON lines in production, with the step's fields),
    instead of Celery replacing the root logger's handlers with its own format."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


@worker_init.connect
def _persistent_db_connections(**kwargs: object) -> None:
    """Workers run each task on one thread, so persistent connections are safe there and save a
    connect per task (the web process keeps them off: under ASGI they pile up per thread)."""
    from django.db import connections

    age = int(os.environ.get("WORKER_DB_CONN_MAX_AGE", "300"))
    for connection in connections.all():
        connection.settings_dict["CONN_MAX_AGE"] = age


@worker_init.connect
def _settle_collector(**kwargs: object) -> None:
    """What the worker loaded at start is kept out of full collections (before a prefork pool
    forks its children, who then share it unchanged)."""
    from core.collector import settle_after_startup

    settle_after_startup()


# By worker name: the embedded default runs two workers in one process.
_announcers: dict[str, Any] = {}


@worker_ready.connect
def _announce_pool(sender: object = None, **kwargs: object) -> None:
    """Tell the dispatcher which queues (lanes) this worker consumes and how many slots it has."""
    from core.workers import Announcer

    consumer: Any = sender
    queues = [queue.name for queue in consumer.task_consumer.queues]
    slots = int(getattr(consumer.controller, "concurrency", 1) or 1)
    if getattr(consumer.controller.pool_cls, "__module__", "") == "celery.concurrency.thread":
        # Many steps at once on threads: their database work goes to a few coordination threads,
        # so the connections this process holds do not grow with its slots; a pool of fewer
        # slots than that does its own (core.coordination).
        from django.conf import settings

        from core.coordination import coordinate_on_threads, current

        if current() is None:  # the embedded default sets it up before its workers start
            coordinator = coordinate_on_threads(settings.RUNWARDEN_COORDINATION_THREADS, slots=slots)
            logger.info(
                "threads pool of %d slots: steps' database work %s, %d coordination thread(s)",
                slots,
                "on each slot's own connection" if coordinator.slots_do_their_own else "handed off",
                coordinator.threads,
            )
    _announcers[consumer.hostname] = Announcer(name=consumer.hostname, queues=queues, slots=slots).start()


@worker_shutting_down.connect
def _withdraw_pool(**kwargs: object) -> None:
    for announcer in _announcers.values():
        announcer.stop()
