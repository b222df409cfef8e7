from __future__ import annotations

from celery import shared_task

from approvals import services


@shared_task(name="approvals.expire", ignore_result=True)
def approvals_expire_task() -> int:
    return services.approvals_expire()
