"""Celery tasks: thin interfaces to the executor (steps run on lane queues)."""

from __future__ import annotations

from celery import Task, shared_task
from django.db import close_old_connections, connections

from core import coordination
from core.workers import local_queues
from runs import executor
from runs.queueing import EXECUTE_STEP_TASK


def _lane(task: Task) -> str:
    """The queue (lane) the task was taken from (not the worker's hostname: two workers of the
    embedded default share one process, and a worker started in code reports the machine's).
    A step is sent to its lane's queue, whose routing key is its name (no ``task_routes``)."""
    return str((task.request.delivery_info or {}).get("routing_key") or "")


@shared_task(name=EXECUTE_STEP_TASK, bind=True, acks_late=True, ignore_result=True)
def execute_step_task(self: Task, *, step_id: int, token: int) -> str:
    close_old_connections()  # connections are kept across tasks: drop a broken one first
    try:
        # Where caps and lanes allow, the worker goes straight on with the run's next step.
        return executor.step_execute(step_id=step_id, token=token, lanes=local_queues(_lane(self)))
    finally:
        if not coordination.steps_do_their_own():
            # Many steps on threads: a body's own queries (the demo's sandbox) keep no
            # connection open between steps; Runwarden's own went to the coordination threads.
            connections.close_all()
