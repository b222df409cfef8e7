from __future__ import annotations

from celery import shared_task

from core import outbox


@shared_task(name="core.outbox_drain", ignore_result=True)
def outbox_drain_task() -> int:
    return outbox.outbox_drain()
