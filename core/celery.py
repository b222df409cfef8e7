"""The Celery app. Workers: ``celery -A core worker -Q <queues>``; beat: ``celery -A core beat``."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings")

app = Celery("runwarden")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
