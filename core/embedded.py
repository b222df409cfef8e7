"""The embedded default: a real Celery worker (and beat) inside the web process.

With no REDIS_URL the broker is kombu's in-memory transport, which only works when producer
and consumer share a process; so ``manage.py serve`` starts the worker here, in a thread.
Steps still go through Celery, exactly as they do with separate worker processes, and the
dispatcher (``settings.EMBEDDED_BACKGROUND``) runs as a thread beside it.
"""

from __future__ import annotations

import logging
import threading

from celery import beat
from celery.worker import WorkController
from django.conf import settings
from django.utils.module_loading import import_string

from core.celery import app

logger = logging.getLogger(__name__)

ALL_QUEUES = ["celery", "read", "draft", "external", "high_risk", "maintenance"]


def start_embedded_worker(*, with_beat: bool = True) -> WorkController:
    worker = WorkController(
        app=app,
        hostname="embedded@localhost",
        pool="solo",
        concurrency=1,
        queues=ALL_QUEUES,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="INFO",
    )
    threading.Thread(target=worker.start, name="celery-embedded-worker", daemon=True).start()
    if with_beat:
        beat_service = beat.EmbeddedService(app, thread=True, schedule_filename="var/celerybeat-schedule")
        assert isinstance(beat_service, threading.Thread)
        beat_service.start()
    for starter in settings.EMBEDDED_BACKGROUND:
        import_string(starter)()
    logger.info("embedded Celery worker started on queues %s", ", ".join(ALL_QUEUES))
    return worker
