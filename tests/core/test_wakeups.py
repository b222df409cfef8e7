"""Conditional wake-ups read their mark and wake the dispatcher in one round trip to Redis."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from django.db import transaction

from core import wakeups
from core.redis_client import get_redis


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
def test_a_commits_wake_up_is_sent_after_it_by_the_processs_sender_and_a_rollbacks_never(
    redis_marks: None,
) -> None:
    with transaction.atomic():
        wakeups.wake_on_commit(lane="read")
        assert wakeups.flush_wakes() and not woken(), "nothing is sent before the commit"
    assert wakeups.flush_wakes() and woken()
    with pytest.raises(RuntimeError), transaction.atomic():
        wakeups.wake_on_commit()
        raise RuntimeError("rolled back")
    assert wakeups.flush_wakes() and not woken()
    wakeups.mark_waiting(False, saturated={"read"})  # still judged when it is sent
    wakeups.wake_on_commit(lane="read")  # outside a transaction: committed already
    assert wakeups.flush_wakes() and not woken()


def test_a_wake_up_asked_for_while_the_same_one_is_being_sent_is_sent_again(redis_marks: None) -> None:
    # The dispatcher may have taken the first before the second's commit: it must see one more.
    sender = wakeups._Sender()
    in_flight, go_on, sent = threading.Event(), threading.Event(), []

    def wake(label: str) -> None:
        sent.append(label)
        if len(sent) == 1:
            in_flight.set()
            assert go_on.wait(5)

    sender.send(wake, ("a",))
    assert in_flight.wait(5)
    for _ in range(3):  # asked three times while "a" is on its way: sent once more, not three
        sender.send(wake, ("a",))
    sender.send(wake, ("b",))
    go_on.set()
    assert sender.flush(5)
    assert sent == ["a", "a", "b"]
