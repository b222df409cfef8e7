"""Handing admitted steps to Celery, by task name: domain code never imports its own task
module (the tasks import the services, not the other way round)."""

from __future__ import annotations

import logging

from core.celery import app

logger = logging.getLogger(__name__)

EXECUTE_STEP_TASK = "runs.execute_step"


def enqueue_step(step_id: int, token: int, lane: str) -> None:
    """Send an admitted step to its lane's queue. If the broker is down, the dispatcher's
    sweep re-sends it (same token) and, past the pickup timeout, the step is admitted anew:
    nothing is lost, and a duplicate delivery exits without running."""
    try:
        app.send_task(EXECUTE_STEP_TASK, kwargs={"step_id": step_id, "token": token}, queue=lane)
    except Exception:
        logger.warning(
            "could not enqueue step %s; the dispatcher's sweep will re-send it", step_id, exc_info=True
        )
