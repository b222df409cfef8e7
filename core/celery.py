"""The Celery app. Workers: ``celery -A core worker -Q <queues>``; beat: ``celery -A core beat``."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings")

app = Celery("runwarden")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def _persistent_db_connections(**kwargs: object) -> None:
    """Workers run each task on one thread, so persistent connections are safe there and save a
    connect per task (the web process keeps them off: under ASGI they pile up per thread)."""
    from django.db import connections

    age = int(os.environ.get("WORKER_DB_CONN_MAX_AGE", "300"))
    for connection in connections.all():
        connection.settings_dict["CONN_MAX_AGE"] = age
