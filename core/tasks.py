from __future__ import annotations

from celery import shared_task

from core import outbox, tallies


@shared_task(name=outbox.DRAIN_TASK, ignore_result=True)
def outbox_drain_task() -> int:
    return outbox.outbox_drain()


@shared_task(name="core.tallies_prune", ignore_result=True)
def tallies_prune_task() -> int:
    return tallies.tallies_prune()
