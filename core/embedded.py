"""The embedded default: real Celery workers (and beat) inside the web process.

With no REDIS_URL the broker is kombu's in-memory transport, which only works when producer
and consumer share a process; so ``manage.py serve`` starts the workers here, in threads.
Steps still go through Celery, exactly as they do with separate worker processes, and the
dispatcher (``settings.EMBEDDED_BACKGROUND``) runs as a thread beside them.

Two workers, as the Procfile's lanes are sized: the waiting lanes (``read``, ``draft``) on
Celery's threads pool with ``RUNWARDEN_EMBEDDED_WAITING_SLOTS`` steps at once, the other queues
one task at a time. The process hands the database work of both to coordination threads
(``core.coordination``; one on SQLite, which lets one writer in at a time), so a step that
waits on a model holds no connection.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from celery import Celery, beat, signals
from celery.worker import WorkController
from django.conf import settings
from django.utils.module_loading import import_string

from core.celery import app, make_app
from core.coordination import coordinate_on_threads

logger = logging.getLogger(__name__)

# The lanes (runs.definitions.LANES) as the Procfile's workers split them, and Celery's own queue.
WAITING_QUEUES = ["read", "draft"]
ONE_AT_A_TIME_QUEUES = ["celery", "external", "high_risk", "maintenance"]


class _Worker(WorkController):
    """A worker started in code says it is ready as ``celery worker`` does, so it announces its
    slots and lanes (``core.celery``): admission fills its free slots, a finishing step's task
    goes on in its lanes, and a threads pool hands its database work to coordination threads."""

    def on_consumer_ready(self, consumer: Any) -> None:
        super().on_consumer_ready(consumer)
        signals.worker_ready.send(sender=consumer)


def _start_worker(
    *, name: str, queues: list[str], pool: str, slots: int, on_app: Celery = app
) -> WorkController:
    worker = _Worker(
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
    # Before either worker runs a step, so no chain switches where it does its database work.
    coordinate_on_threads(settings.RUNWARDEN_COORDINATION_THREADS)
    workers = [
        _start_worker(
            name="embedded-waiting",
            queues=WAITING_QUEUES,
            pool="threads",
            slots=settings.RUNWARDEN_EMBEDDED_WAITING_SLOTS,
            # Its own app: a worker selects the queues it consumes on its app, so two workers
            # sharing one would both consume the last one's. Tasks are shared_tasks, known to
            # every app; the in-memory broker is one for the process.
            on_app=make_app(set_as_current=False),
        ),
        _start_worker(name="embedded", queues=ONE_AT_A_TIME_QUEUES, pool="solo", slots=1),
    ]
    if with_beat:
        # Next to the database: two embedded processes on two databases (two tests at once)
        # never share the schedule file, which dbm.dumb does not lock.
        schedule = Path(settings.DATABASES["default"]["NAME"]).parent / "celerybeat-schedule"
        beat_service = beat.EmbeddedService(app, thread=True, schedule_filename=str(schedule))
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
