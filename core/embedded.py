"""The embedded default: real Celery workers (and beat) inside the web process.

With no REDIS_URL the broker is kombu's in-memory transport, which only works when producer
and consumer share a process; so ``manage.py serve`` starts the workers here, in threads.
Steps still go through Celery, exactly as they do with separate worker processes, and the
dispatcher (``settings.EMBEDDED_BACKGROUND``) runs as a thread beside them.

Two workers, as the Procfile's lanes are sized: the waiting lanes (``read``, ``draft``) on
Celery's threads pool with ``RUNWARDEN_EMBEDDED_WAITING_SLOTS`` steps at once, their database
work on the coordination threads (one on SQLite: it lets one writer in at a time, and a step
that waits on a model holds no connection); the other queues one task at a time.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery, beat
from celery.worker import WorkController
from django.conf import settings
from django.utils.module_loading import import_string

from core.celery import app

logger = logging.getLogger(__name__)

WAITING_QUEUES = ["read", "draft"]
ONE_AT_A_TIME_QUEUES = ["celery", "external", "high_risk", "maintenance"]
ALL_QUEUES = [*ONE_AT_A_TIME_QUEUES, *WAITING_QUEUES]


def _app_of_its_own() -> Celery:
    """A second app for a second worker of this process: a worker selects the queues it consumes
    on its app, so two workers sharing one would both consume the last one's queues. Tasks are
    ``shared_task``s, known to every app; the in-memory broker is one for the process."""
    other = Celery(app.main)
    other.config_from_object("django.conf:settings", namespace="CELERY")
    other.autodiscover_tasks()
    return other


def _start_worker(
    *, name: str, queues: list[str], pool: str, slots: int, on_app: Celery = app
) -> WorkController:
    worker = WorkController(
        app=on_app,
        hostname=f"{name}@localhost",
        pool=pool,
        concurrency=slots,
        queues=queues,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="INFO",
    )
    threading.Thread(target=worker.start, name=f"celery-{name}", daemon=True).start()
    return worker


def start_embedded_worker(*, with_beat: bool = True) -> list[WorkController]:
    workers = [
        _start_worker(
            name="embedded-waiting",
            queues=WAITING_QUEUES,
            pool="threads",
            slots=settings.RUNWARDEN_EMBEDDED_WAITING_SLOTS,
            on_app=_app_of_its_own(),
        ),
        _start_worker(name="embedded", queues=ONE_AT_A_TIME_QUEUES, pool="solo", slots=1),
    ]
    if with_beat:
        beat_service = beat.EmbeddedService(app, thread=True, schedule_filename="var/celerybeat-schedule")
        assert isinstance(beat_service, threading.Thread)
        beat_service.start()
    for starter in settings.EMBEDDED_BACKGROUND:
        import_string(starter)()
    logger.info(
        "embedded Celery workers started: %s with %d slots, %s one at a time",
        ", ".join(WAITING_QUEUES),
        settings.RUNWARDEN_EMBEDDED_WAITING_SLOTS,
        ", ".join(ONE_AT_A_TIME_QUEUES),
    )
    return workers
