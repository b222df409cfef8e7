"""A step task goes on with the next step of the lanes its own worker pool consumes."""

from __future__ import annotations

from core.workers import Announcer, local_queues


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
