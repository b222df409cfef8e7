"""A step task goes on with the next step of the lanes its own worker pool consumes."""

from __future__ import annotations

import os

from core.workers import Announcer, idle_local_slots, local_queues, slot_taken


def test_a_task_goes_on_in_the_lanes_of_the_pool_that_took_it_from_its_queue() -> None:
    # As in the embedded default: two pools in one process, told apart by the queue a task came from.
    waiting = Announcer(name="test-waiting@lanes", queues=["read", "draft"], slots=50).start()
    one_at_a_time = Announcer(name="test-one@lanes", queues=["celery", "external"], slots=1).start()
    try:
        assert local_queues("draft") == {"read", "draft"}
        assert local_queues("external") == {"celery", "external"}
        # A prefork worker's child does not see what its parent announced: the lane itself.
        assert local_queues("high_risk") == {"high_risk"}
        assert local_queues("") == frozenset()  # not taken from a queue (called in process)
    finally:
        for announcer in (waiting, one_at_a_time):
            announcer.stop()
    assert local_queues("draft") == {"draft"}, "a stopped pool's lanes are forgotten"


def test_a_pools_idle_slots_are_its_slots_less_the_steps_it_runs_and_a_forked_child_knows_none() -> None:
    waiting = Announcer(name="test-idle@lanes", queues=["read", "draft"], slots=3).start()
    lanes = local_queues("read")
    try:
        assert idle_local_slots(lanes) == 3
        with slot_taken(lanes):
            assert idle_local_slots(lanes) == 2
            with slot_taken(lanes), slot_taken(lanes), slot_taken(lanes):
                assert idle_local_slots(lanes) == 0  # never below 0
            assert idle_local_slots(lanes) == 2
        assert idle_local_slots(frozenset({"external"})) == 0  # no pool of this process
        # A prefork pool's child runs one step at a time: the parent's slots are not its own.
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe and exits
            try:
                os.write(write_end, str(idle_local_slots(lanes)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(child, 0)
        with os.fdopen(read_end, "rb") as answer:
            assert answer.read() == b"0"
    finally:
        waiting.stop()
    assert idle_local_slots(lanes) == 0, "a stopped pool's slots are forgotten"
