"""Helpers for approval tests: start a run that waits for an approval, drive steps in-process,
and find what a run is waiting on."""

from __future__ import annotations

import time
from collections.abc import Callable

from approvals.models import ApprovalRequest
from core.models import Tenant
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.models import Run
from runs.services import run_start


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


def followup(tenant: Tenant, actor: str = "bot", lead_id: int = 7) -> Run:
    """A demo.lead_followup run (two steps, then a send gated by one approval), not yet driven."""
    return run_start(
        tenant=tenant, workflow="demo.lead_followup", input={"lead_id": lead_id, "contact_id": 1}, actor=actor
    ).run


def waiting_followup(tenant: Tenant, actor: str = "bot") -> ApprovalRequest:
    """A demo.lead_followup run driven up to its gated send: the request it waits on."""
    run = followup(tenant, actor)
    pump()
    return pending_request(run)
