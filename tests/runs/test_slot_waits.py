"""Governed calls waiting for a slot under their tool's cap: woken as a call of the same process
gives a slot back (``runs.slot_waits``), one attempt per tool at a time at the whole admission
lock (``runs.tools._alone_for_its_tool``), and between two looks a heartbeat's database check
once per interval at most (``StepContext.heartbeat_due``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connections, transaction

from core.models import Tenant
from runs import executor
from runs.dispatch import dispatch_round
from runs.interrupts import LeaseLost
from runs.models import Step, ToolCall, ToolCallStatus
from runs.services import run_start
from runs.slot_waits import slot_released, slot_wait, slot_wait_async, slots_released_so_far
from runs.tools import _alone_for_its_tool, call_finish, slot_try_take
from tests.dialects import RACING_THREADS
from tests.runs.cluster import wait_for

pytestmark = pytest.mark.both_dialects

LONG = 30.0  # a waiter not woken would wait this long: far past every join below


def waiting(tool: str, done: list[str], name: str) -> threading.Thread:
    """A thread waiting for a slot of ``tool`` (seen now), noting ``name`` in ``done`` when woken."""
    seen = slots_released_so_far(tool)

    def wait() -> None:
        slot_wait(tool, seen, LONG)
        done.append(name)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_a_slot_given_back_wakes_the_call_waiting_longest_for_that_tool_only() -> None:
    done: list[str] = []
    first = waiting("crm-a", done, "first")
    wait_for(lambda: _queued_for("crm-a") == 1, 5, "the waiters queued", interval=0.005)
    second = waiting("crm-a", done, "second")
    other = waiting("mail-a", done, "other tool")
    queued = {"crm-a": 2, "mail-a": 1}
    wait_for(lambda: all(_queued_for(t) == n for t, n in queued.items()), 5, "the waiters", interval=0.005)
    slot_released("crm-a")
    first.join(5)
    assert done == ["first"] and second.is_alive() and other.is_alive()
    slot_released("crm-a")
    second.join(5)
    slot_released("mail-a")
    other.join(5)
    assert done == ["first", "second", "other tool"]


def test_a_slot_given_back_between_the_look_and_the_wait_is_not_waited_for() -> None:
    seen = slots_released_so_far("crm-b")
    slot_released("crm-b")  # after the look that found the cap full, before the wait
    done: list[str] = []

    def wait() -> None:
        slot_wait("crm-b", seen, LONG)
        done.append("returned")

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(5)
    assert done == ["returned"]
    assert _queued_for("crm-b") == 0


def test_an_async_body_waiting_for_a_slot_is_woken_from_another_thread() -> None:
    async def wait() -> float:
        seen = slots_released_so_far("crm-c")
        started = time.monotonic()
        threading.Timer(0.05, slot_released, args=("crm-c",)).start()
        await slot_wait_async("crm-c", seen, LONG)
        return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(wait(), 10)) < 5  # woken, not timed out
    assert _queued_for("crm-c") == 0


def test_a_wait_that_times_out_leaves_no_waiter_behind() -> None:
    slot_wait("crm-d", slots_released_so_far("crm-d"), 0.01)
    assert _queued_for("crm-d") == 0


def _queued_for(tool: str) -> int:
    from runs import slot_waits

    with slot_waits._lock:
        return len(slot_waits._waiting.get(tool, ()))


@contextmanager
def attempt_under_way(tool: str) -> Iterator[None]:
    """For the block, another connection's attempt at a slot of ``tool`` holds its place."""
    holding, release = threading.Event(), threading.Event()

    def attempt() -> None:
        try:
            with transaction.atomic():
                assert _alone_for_its_tool(tool)
                holding.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=attempt)
    thread.start()
    assert holding.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join(10)


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_one_attempt_per_tool_at_a_time_takes_the_whole_admission_lock() -> None:
    """While one attempt at a slot of a tool holds its place, another of the same tool does not
    queue behind it (it waits for a slot like a full cap's); one of another tool goes on."""
    with attempt_under_way("crm-e"), transaction.atomic():
        assert not _alone_for_its_tool("crm-e")
        assert _alone_for_its_tool("mail-e")
    with transaction.atomic():
        assert _alone_for_its_tool("crm-e")  # the first attempt's transaction ended


def a_call(tenant: Tenant, tool: str) -> ToolCall:
    """A governed call of ``tool`` opened by a running step (its record, as ``ctx.tool`` opens it)."""
    run = run_start(tenant=tenant, workflow="bench.noop", input={}, actor="t").run
    step = Step.objects.get(run=run)
    return ToolCall.objects.create(tenant=tenant, run=run, step=step, key="1", tool=tool)


@pytest.mark.django_db(transaction=True)
def test_a_call_ending_gives_its_slot_back_and_wakes_a_call_of_this_process_waiting_for_it(
    acme: Tenant,
) -> None:
    call = a_call(acme, "crm-f")
    slot = slot_try_take(call=call, caps={"tool:crm-f": 1}, holder="t", ttl=30)
    assert slot is not None
    waiter = a_call(acme, "crm-f")
    assert slot_try_take(call=waiter, caps={"tool:crm-f": 1}, holder="t", ttl=30) is None  # full
    done: list[str] = []
    thread = waiting("crm-f", done, "waiter")
    wait_for(lambda: _queued_for("crm-f") == 1, 5, "the waiters queued", interval=0.005)
    call_finish(call, ToolCallStatus.SUCCEEDED, idempotency_key="none", release=[slot])
    thread.join(5)
    assert done == ["waiter"]
    assert slot_try_take(call=waiter, caps={"tool:crm-f": 1}, holder="t", ttl=30) is not None


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_a_look_for_a_slot_while_another_of_its_tool_is_under_way_takes_nothing_and_waits_for_none(
    acme: Tenant,
) -> None:
    call = a_call(acme, "crm-g")
    with attempt_under_way("crm-g"):
        assert slot_try_take(call=call, caps={"tool:crm-g": 4}, holder="t", ttl=30) is None
        call.refresh_from_db()
        assert call.status == ToolCallStatus.WAITING  # no slot, and no queueing for the lock
    assert slot_try_take(call=call, caps={"tool:crm-g": 4}, holder="t", ttl=30) is not None


@pytest.mark.django_db(transaction=True)
def test_between_looks_the_database_is_asked_once_per_heartbeat_interval(acme: Tenant) -> None:
    run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    admitted = dispatch_round()[0]
    ctx = executor._start(admitted.step_id, admitted.token).ctx
    assert ctx is not None
    ctx.heartbeat()
    assert not ctx.heartbeat_due()  # just checked with the database
    ctx._beaten_at -= ctx.lease_seconds / 3
    assert ctx.heartbeat_due()
    ctx.heartbeat()
    ctx._lost.set()  # the worker's heartbeat found a lease gone: the database says why, at once
    assert ctx.heartbeat_due()
    ctx.timed_out.set()
    with pytest.raises(LeaseLost):
        ctx.heartbeat_due()
