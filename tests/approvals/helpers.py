"""Helpers for approval tests: drive steps in-process, and find what a run is waiting on."""

from __future__ import annotations

import time
from collections.abc import Callable

from approvals.models import ApprovalRequest
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.models import Run


def pump(rounds: int = 8) -> list[str]:
    """Dispatch and execute ready steps in this process until nothing is ready (no workers)."""
    outcomes = []
    for _ in range(rounds):
        admitted = dispatch_round()
        if not admitted:
            break
        outcomes += [step_execute(step_id=a.step_id, token=a.token) for a in admitted]
    return outcomes


def pump_until(predicate: Callable[[], object], rounds: int = 40) -> None:
    """Pump, also across short retry backoffs, until ``predicate()`` holds."""
    for _ in range(rounds):
        pump()
        if predicate():
            return
        time.sleep(0.05)


def pending_request(run: Run) -> ApprovalRequest:
    return ApprovalRequest.objects.select_related("step__run", "artifact_version").get(
        run=run, status="pending"
    )
