"""Helpers for approval tests: start a run that waits for an approval, drive steps in-process,
and find what a run is waiting on."""

from __future__ import annotations

import time
from collections.abc import Callable

from approvals.models import ApprovalRequest
from core.celery import app
from core.models import Tenant
from runs.definitions import LANES
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.models import Run, StepStatus
from runs.services import run_start

# A resumed step: ready, or already admitted by the deciding process (core.direct_admission:
# on PostgreSQL, where it fits; the embedded default's SQLite leaves it to the dispatcher).
RESUMED = (StepStatus.READY, StepStatus.LEASED)


def pump(rounds: int = 8) -> list[str]:
    """Dispatch and execute ready steps in this process until nothing is ready (no workers):
    the steps a round admits, and those already sent to the lanes' queues (a decision's
    resumed step, admitted straight after its commit: core.direct_admission)."""
    outcomes = []
    for _ in range(rounds):
        admitted = [(a.step_id, a.token) for a in dispatch_round()]
        # The round's own admissions are on the queues too: each runs once, here.
        sent = [task for task in sent_to_workers() if task not in admitted]
        if not admitted and not sent:
            break
        outcomes += [step_execute(step_id=step_id, token=token) for step_id, token in admitted]
        # What an earlier test's round left on the queues finds its step gone ("not-ours").
        ran = [step_execute(step_id=step_id, token=token) for step_id, token in sent]
        outcomes += [outcome for outcome in ran if outcome != "not-ours"]
    return outcomes


def sent_to_workers() -> list[tuple[int, int]]:
    """The steps waiting in the lanes' queues, taken off the broker as a worker takes them:
    (step id, token) each. One sent by an earlier test finds its step gone and does nothing."""
    return [(step_id, token) for _, _, step_id, token in taken_from_queues()]


def taken_from_queues() -> list[tuple[str, str, int, int]]:
    """``sent_to_workers`` with where each was and what it asks: (lane, task name, step id,
    token) each."""
    taken = []
    with app.connection_for_read() as connection:
        for lane in LANES:
            with connection.SimpleQueue(lane) as queue:
                while True:
                    try:
                        message = queue.get_nowait()
                    except queue.Empty:
                        break
                    _, kwargs, _ = message.decode()  # Celery's task message: args, kwargs, options
                    message.ack()
                    taken.append((lane, message.headers["task"], kwargs["step_id"], kwargs["token"]))
    return taken


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
