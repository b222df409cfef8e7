"""Lock waits that close a cycle are found and broken: each step holds the entity lock declared
for it and then asks, mid-step, for the next one's. Exactly one wait per cycle gives way (the
youngest by default, the oldest where the workflow says so) with LockDeadlock well before its
wait would time out; its step is retried, the others finish; each cycle is an event."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from core.deadlocks import waits_for_board
from core.leases import lease_acquire, lease_release
from core.models import Event, LockWaiter, Tenant, User
from runs.context import StepContext
from runs.definitions import WorkflowInput, workflow
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.invariants import check_invariants
from runs.models import Run, RunStatus, Step
from runs.services import run_start
from tests.approvals.helpers import pump_until, sent_to_workers
from tests.conftest import bearer_client, client_for
from tests.dialects import RACING_THREADS

pytestmark = pytest.mark.both_dialects


class Pair(WorkflowInput):
    first: str
    then: str
    wait_for: int = 2  # how many steps must hold their first key before any asks for its next


HOLDING: dict[str, threading.Barrier] = {}
GAVE_WAY: list[tuple[str, str, float]] = []  # (run id, holder that gave way, seconds it waited)


def hold_then_take(ctx: StepContext) -> dict[str, Any]:
    """Holds ``first`` (declared), then, once every step of the cycle holds its own, takes
    ``then`` mid-step: the waits close a cycle. A retry runs without waiting for the others."""
    if ctx.attempt == 1:
        HOLDING[ctx.input["first"].split(":")[0]].wait(10)
    began = time.monotonic()
    try:
        ctx.lock(ctx.input["then"], wait_timeout=30)
    except Exception as exc:
        GAVE_WAY.append((ctx.run_id, type(exc).__name__, time.monotonic() - began))
        raise
    return {"took": ctx.input["then"], "attempt": ctx.attempt}


youngest = workflow("test.deadlock_youngest", description="holds one key, then takes another", input=Pair)
youngest.step(lane="draft", locks=["{first}"])(hold_then_take)
oldest = workflow(
    "test.deadlock_oldest", description="the same, the oldest waiter gives way", input=Pair,
    deadlock_policy="kill_oldest_waiter",
)  # fmt: skip
oldest.step(lane="draft", locks=["{first}"])(hold_then_take)


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    HOLDING.clear()
    GAVE_WAY.clear()
    yield


def run_cycle(tenant: Tenant, flow: str, prefix: str, size: int) -> list[Run]:
    """Start ``size`` runs whose keys form a cycle (k0 -> k1 -> ... -> k0), each the next a
    little younger in its wait."""
    HOLDING[prefix] = threading.Barrier(size)
    return [
        run_start(
            tenant=tenant,
            workflow=flow,
            input={"first": f"{prefix}:k{i}", "then": f"{prefix}:k{(i + 1) % size}", "wait_for": size},
            actor="t",
        ).run
        for i in range(size)
    ]


def execute_all() -> list[threading.Thread]:
    """Run the steps a round admits, each on a thread of its own, as workers would: taken off
    the lanes' queues too, so a later ``pump`` cannot take one first and run it in the test's own
    thread, where its wait for a lock would hold up the test itself."""
    threads = []
    admitted = [(admission.step_id, admission.token) for admission in dispatch_round()]
    sent_to_workers()  # these, and what an earlier test left there (its steps are gone)
    for step_id, token in admitted:

        def execute(step_id: int = step_id, token: int = token) -> None:
            try:
                step_execute(step_id=step_id, token=token)
            finally:
                connections.close_all()

        threads.append(threading.Thread(target=execute))
        threads[-1].start()
    return threads


def settle(runs: list[Run], threads: list[threading.Thread]) -> list[Run]:
    for thread in threads:
        thread.join(45)
    ids = [run.pk for run in runs]
    pump_until(
        lambda: all(r.status == RunStatus.SUCCEEDED for r in Run.objects.filter(pk__in=ids)), rounds=80
    )
    return list(Run.objects.filter(pk__in=ids))


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("size", [2, 3])
def test_a_cycle_of_waits_is_broken_by_exactly_one_victim_and_the_others_finish(
    acme: Tenant, globex: Tenant, acme_operator: User, size: int
) -> None:
    """Two cycles at once, one per tenant, over keys of the same names."""
    cycles = {
        tenant.slug: run_cycle(tenant, youngest.key, f"{tenant.slug}{size}", size)
        for tenant in (acme, globex)
    }
    threads = execute_all()
    assert len(threads) == 2 * size
    done = settle([run for runs in cycles.values() for run in runs], threads)
    assert {run.status for run in done} == {RunStatus.SUCCEEDED}
    print(f"cycles of {size}: gave way {GAVE_WAY}")
    # One victim per cycle, by deadlock (not by a timeout), well within its 30 s wait.
    assert sorted(name for _, name, _ in GAVE_WAY) == ["LockDeadlock", "LockDeadlock"], GAVE_WAY
    victims = {run_id for run_id, _, _ in GAVE_WAY}
    for slug, runs in cycles.items():
        ids = {run.pk for run in runs}
        assert len(victims & ids) == 1, (slug, GAVE_WAY)
        events = Event.objects.filter(verb="deadlock_detected", tenant__slug=slug)
        assert events.count() == 1
        cycle = events.get().payload["cycle"]
        assert len(cycle) == size and {step["holder"].split(":")[0] for step in cycle} == ids
        # The youngest waiter gave way: the one that started waiting last (the last to ask).
        victim = (victims & ids).pop()
        assert events.get().payload["victim"].startswith(victim)
        assert Step.objects.get(run_id=victim).attempt == 2  # retried; the others ran once
        assert {Step.objects.get(run=run).attempt for run in runs if run.pk != victim} == {1}
    assert not LockWaiter.objects.exists()  # every wait's record is gone with it
    # The board lists the cycle; the overview counts it (acme's only, for an acme operator).
    operator = client_for(acme_operator)
    board = operator.get("/leases/").content.decode()
    assert (
        "Deadlocks in the last hour" in board
        and f"acme{size}:k0" in board
        and f"globex{size}:k0" not in board
    )
    assert "deadlocks broken: <strong>1</strong>" in operator.get("/").content.decode()
    assert check_invariants() == []


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_a_workflow_may_have_the_oldest_waiter_give_way(acme: Tenant) -> None:
    runs = run_cycle(acme, oldest.key, "old", 2)
    done = settle(runs, execute_all())
    assert {run.status for run in done} == {RunStatus.SUCCEEDED}
    event = Event.objects.get(verb="deadlock_detected")
    assert event.payload["policy"] == "kill_oldest_waiter"
    waited = {run_id: seconds for run_id, _, seconds in GAVE_WAY}
    assert len(waited) == 1
    victim = event.payload["victim"].split(":")[0]
    assert victim in waited


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_the_board_shows_a_wait_with_its_holder(acme: Tenant, acme_operator: User) -> None:
    """A wait that is no cycle: it is on the board with who holds the key, then gone."""
    HOLDING["solo"] = threading.Barrier(1)
    holder = run_start(
        tenant=acme, workflow=youngest.key, input={"first": "solo:a", "then": "solo:b"}, actor="t"
    ).run
    # Someone outside the run holds solo:b for a while.
    blocker = lease_acquire(tenant_id=acme.pk, key="solo:b", holder="outside:agent", ttl=30)
    assert blocker is not None
    threads = execute_all()
    pump_until(lambda: bool(waits_for_board([acme.pk])), rounds=40)
    board = waits_for_board([acme.pk])
    page = client_for(acme_operator).get("/leases/").content.decode()
    assert "Waiting mid-step" in page and "outside:agent" in page
    assert board[0]["run_id"] == holder.pk
    assert board[0]["keys"] == [{"key": "solo:b", "held_by": "outside:agent"}]
    assert board[0]["cycle"] is None
    lease_release(grant=blocker)
    done = settle([holder], threads)
    assert done[0].status == RunStatus.SUCCEEDED
    assert waits_for_board([acme.pk]) == []


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_a_tenant_may_have_the_oldest_waiter_give_way_for_workflows_that_declare_none(
    acme: Tenant, acme_admin: User
) -> None:
    changed = bearer_client(acme_admin).put(
        "/api/v1/tenants/acme/quota",
        data={"deadlock_policy": "kill_oldest_waiter"},
        content_type="application/json",
    )
    assert changed.status_code == 200 and changed.json()["deadlock_policy"] == "kill_oldest_waiter"
    runs = run_cycle(acme, youngest.key, "tenantwide", 2)  # this workflow declares no policy
    done = settle(runs, execute_all())
    assert {run.status for run in done} == {RunStatus.SUCCEEDED}
    assert Event.objects.get(verb="deadlock_detected").payload["policy"] == "kill_oldest_waiter"
    refused = bearer_client(acme_admin).put(
        "/api/v1/tenants/acme/quota",
        data={"deadlock_policy": "kill_everyone"},
        content_type="application/json",
    )
    assert refused.status_code == 422
