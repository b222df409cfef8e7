"""A worker that finds nothing to pull as its chain ends clears its lanes' saturated mark, then
looks once more for a due ready step of its lanes (one made ready in the moment before the mark
was cleared skipped its wake-up): found, it wakes the dispatcher. Real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from datetime import timedelta

import pytest
from django.utils import timezone

from core import rawsql, wakeups
from core.models import Tenant
from core.redis_client import get_redis
from runs.dispatch import _due_ready_step_in, worker_idle
from runs.models import Step, StepStatus
from runs.services import run_start
from tests.wakes import wake_marks_cleared, woken

pytestmark = pytest.mark.django_db(transaction=True)

READ = frozenset({"read"})


@pytest.fixture
def redis_marks() -> Iterator[None]:
    wake_marks_cleared(wakeups.WAKE_KEY, wakeups.SATURATED_KEY)
    yield
    wake_marks_cleared(wakeups.WAKE_KEY, wakeups.SATURATED_KEY)


def read_step(tenant: Tenant) -> Step:
    """A ready step of lane read (``bench.noop``), its start's own wake-up taken."""
    step = Step.objects.get(run=run_start(tenant=tenant, workflow="bench.noop", input={}, actor="bot").run)
    if get_redis() is not None:
        woken()
    return step


@pytest.fixture(params=[False, True], ids=["plain", "prepared"])
def statements(request: pytest.FixtureRequest) -> Iterator[None]:
    """Both ways the look runs: a plain execute, and a worker's chain preparing its statements."""
    with rawsql.prepared_statements() if request.param else nullcontext():
        yield


def test_an_idle_worker_clears_its_lanes_saturated_mark(
    acme: Tenant, statements: None, redis_marks: None
) -> None:
    client = get_redis()
    assert client is not None
    wakeups.mark_waiting(False, saturated={"read", "draft"})
    worker_idle(READ)
    assert client.smembers(wakeups.SATURATED_KEY) == {b"draft"}  # another lane's mark stays
    assert not woken()  # nothing was ready
    wakeups.mark_waiting(False, saturated=set())


def test_a_due_ready_step_of_its_lanes_wakes_the_dispatcher(
    acme: Tenant, statements: None, redis_marks: None
) -> None:
    read_step(acme)
    worker_idle(READ)
    assert woken()
    worker_idle(frozenset({"draft", "read"}))  # any of the worker's lanes
    assert woken()


def test_a_step_not_due_or_not_ready_or_of_another_lane_wakes_nothing(
    acme: Tenant, statements: None, redis_marks: None
) -> None:
    later = read_step(acme)
    Step.objects.filter(pk=later.pk).update(available_at=timezone.now() + timedelta(minutes=5))
    leased = read_step(acme)
    Step.objects.filter(pk=leased.pk).update(status=StepStatus.LEASED)
    read_step(acme)  # ready and due, but of lane read, not draft
    worker_idle(frozenset({"draft"}))
    assert not woken()
    worker_idle(READ)
    assert woken()  # the third one
    Step.objects.filter(run__tenant=acme, status=StepStatus.READY, available_at__isnull=True).update(
        status=StepStatus.CANCELLED
    )
    worker_idle(READ)
    assert not woken()  # only the one due in five minutes is ready
    Step.objects.filter(pk=later.pk).update(available_at=timezone.now() - timedelta(seconds=1))
    worker_idle(READ)
    assert woken()  # its time has come


@pytest.mark.both_dialects
def test_the_look_for_due_work_reads_ready_due_steps_of_the_lanes_on_either_database(acme: Tenant) -> None:
    """The look itself (``_due_ready_step_in``), on PostgreSQL and on the embedded SQLite."""
    now = timezone.now()
    later = read_step(acme)
    Step.objects.filter(pk=later.pk).update(available_at=now + timedelta(minutes=5))
    assert not _due_ready_step_in(READ, now)  # not due yet
    assert _due_ready_step_in(READ, now + timedelta(minutes=6))
    read_step(acme)
    assert _due_ready_step_in(READ, now) and not _due_ready_step_in(frozenset({"draft"}), now)
