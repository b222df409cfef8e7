"""Conditional wake-ups read their mark and wake the dispatcher in one round trip to Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core import wakeups
from core.models import Tenant
from core.redis_client import get_redis
from runs.dispatch import worker_idle
from runs.models import Step, StepStatus
from runs.services import run_start


@pytest.fixture
def redis_marks() -> Iterator[None]:
    client = get_redis()
    assert client is not None, "these tests need REDIS_URL"
    keys = [wakeups.WAKE_KEY, wakeups.SATURATED_KEY, wakeups.WAITING_KEY]
    client.delete(*keys)
    yield
    wakeups.mark_waiting(False, saturated=set())
    client.delete(*keys)


def woken() -> bool:
    client = get_redis()
    assert client is not None
    return bool(client.delete(wakeups.WAKE_KEY))  # and take the wake-up, as the dispatcher would


def test_a_ready_step_wakes_the_dispatcher_unless_its_lanes_workers_are_all_busy(redis_marks: None) -> None:
    wakeups.wake_unless_saturated("read")
    assert woken()
    wakeups.mark_waiting(False, saturated={"read"})  # a round found every read slot taken
    wakeups.wake_unless_saturated("read")
    assert not woken()
    wakeups.wake_unless_saturated("draft")  # another lane's workers have room
    assert woken()


def test_freed_room_wakes_the_dispatcher_only_while_steps_wait_for_room(redis_marks: None) -> None:
    wakeups._wake_if_marked(wakeups.WAITING_KEY, wakeups._local_waiting)
    assert not woken()
    wakeups.mark_waiting(True)
    wakeups._wake_if_marked(wakeups.WAITING_KEY, wakeups._local_waiting)
    assert woken()
    for _ in range(3):  # a burst collapses into one wake-up
        wakeups._wake_if_marked(wakeups.WAITING_KEY, wakeups._local_waiting)
    client = get_redis()
    assert client is not None
    assert client.llen(wakeups.WAKE_KEY) == 1


@pytest.mark.django_db(transaction=True)
def test_an_idle_worker_wakes_the_dispatcher_for_work_readied_while_its_lanes_were_marked_busy(
    redis_marks: None, acme: Tenant
) -> None:
    """A run started while the read lane was marked saturated skipped its wake-up; the worker
    that then finds nothing to pull takes the mark off and wakes the dispatcher for it. A lane
    nobody had marked busy lost no wake-up: an idle worker there wakes nobody."""
    wakeups.mark_waiting(False, saturated={"read"})
    run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    assert not woken()  # its workers were all busy: they would pull it themselves
    worker_idle(frozenset({"read", "draft"}))
    assert woken()
    worker_idle(frozenset({"read", "draft"}))  # no longer marked: the start's own wake-up stands
    assert not woken()
    assert Step.objects.filter(run__tenant=acme, status=StepStatus.READY).count() == 1
