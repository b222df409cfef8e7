"""Where a process does its database work (core.coordination): handed to a few coordination
threads by a large threads pool, done by each slot itself in a pool of fewer slots than
``RUNWARDEN_COORDINATION_THREADS`` — but never on a thread running an event loop, where Django
refuses it — on no more connections in all than that number."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from core import coordination

# The coordination threads open their connections as they start their work.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def none_after() -> Iterator[None]:
    yield
    coordination.coordinate_in_place()


def thread_of() -> int:
    return threading.get_ident()


@pytest.mark.parametrize("slots", [8, 9, 100])
def test_a_pool_of_as_many_slots_or_more_hands_its_database_work_to_the_threads(slots: int) -> None:
    coordinator = coordination.coordinate_on_threads(8, slots=slots)
    assert (coordinator.threads, coordinator.slots_do_their_own) == (8, False)
    assert not coordination.steps_do_their_own()
    assert coordination.run(thread_of) != threading.get_ident()


def test_a_small_pools_slots_do_their_own_and_an_event_loops_still_goes_to_the_threads() -> None:
    coordinator = coordination.coordinate_on_threads(8, slots=6)
    # The slots' connections and the threads' together: no more than 8.
    assert (coordinator.threads, coordinator.slots_do_their_own) == (2, True)
    assert coordination.steps_do_their_own()
    assert coordination.run(thread_of) == threading.get_ident()

    async def from_a_loop() -> tuple[int, int, int]:
        handed = await coordinator.call_async(thread_of)
        return threading.get_ident(), handed, coordination.run(thread_of)

    loop_thread, handed, called = asyncio.run(from_a_loop())
    assert handed != loop_thread and called != loop_thread
    # Work in the background is never the caller's, small pool or not.
    future = coordination.run_soon(thread_of)
    assert future is not None and future.result(5) != threading.get_ident()


def test_without_coordination_threads_everything_is_done_in_place() -> None:
    assert coordination.current() is None and coordination.steps_do_their_own()
    assert coordination.run(thread_of) == threading.get_ident()
