"""Conditional wake-ups read their mark and wake the dispatcher in one round trip to Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.test import override_settings

from core import redis_client, wakeups
from core.redis_client import get_redis
from tests.runs.cluster import wait_for
from tests.wakes import wake_marks_cleared, woken


@pytest.fixture
def redis_marks() -> Iterator[None]:
    keys = [wakeups.WAKE_KEY, wakeups.SATURATED_KEY, wakeups.WAITING_KEY, wakeups.LEFT_WAITING_KEY]
    wake_marks_cleared(*keys)
    yield
    wakeups.mark_waiting(False, saturated=set())
    wake_marks_cleared(*keys)


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


def test_a_round_clears_the_waiting_marks_only_if_no_step_began_to_wait_meanwhile(redis_marks: None) -> None:
    """A step that starts waiting for a held key wakes no round but sets the marks; a round in
    progress, which read the count before it looked at the steps and so may not have seen that
    step, leaves them set — a later one, which saw it, may clear them."""
    client = get_redis()
    assert client is not None
    since = wakeups.waiters_added()  # a round begins
    assert wakeups.mark_waiter_added()  # meanwhile a step starts waiting for a held key
    assert client.exists(wakeups.WAITING_KEY) and client.exists(wakeups.LEFT_WAITING_KEY)
    wakeups.mark_left_waiting(False, since=since)
    wakeups.mark_waiting(False, saturated=set(), since=since)
    assert client.exists(wakeups.WAITING_KEY) and client.exists(wakeups.LEFT_WAITING_KEY)
    wakeups._wake_if_marked(wakeups.LEFT_WAITING_KEY, wakeups._local_left_waiting)
    assert woken()  # a release under the admission lock still wakes the next round
    since = wakeups.waiters_added()  # the next round saw the step
    wakeups.mark_left_waiting(False, since=since)
    wakeups.mark_waiting(False, saturated=set(), since=since)
    assert not client.exists(wakeups.WAITING_KEY) and not client.exists(wakeups.LEFT_WAITING_KEY)


def url_as(client: redis.Redis, user: str, password: str) -> str:
    """The URL of ``client``'s server and database, as another user."""
    where = client.connection_pool.connection_kwargs
    return f"redis://{user}:{password}@{where['host']}:{where['port']}/{where.get('db', 0)}"


def test_a_wake_up_is_taken_even_when_redis_fails_right_after_it(redis_marks: None) -> None:
    """Redis failing between the wake-up and the collapse of the ones behind it (here a user
    that may pop but not delete, on the same server) never ends the dispatcher's wait in an
    error: the round runs."""
    admin = get_redis()
    assert admin is not None
    admin.execute_command("ACL", "SETUSER", "rw-pop-only", "on", ">pop-only", "~*", "+@connection", "+blpop")
    try:
        admin.rpush(wakeups.WAKE_KEY, 1)
        with override_settings(REDIS_URL=url_as(admin, "rw-pop-only", "pop-only")):
            redis_client._client = None  # a client for the user that may only pop
            try:
                assert wakeups.wait_for_wake(1.0) is True
            finally:
                redis_client._client = None
    finally:
        admin.execute_command("ACL", "DELUSER", "rw-pop-only")


def _unanswered_connection(client: redis.Redis) -> dict[str, object] | None:
    return next((c for c in client.client_list() if c.get("name") == wakeups._Unanswered.name()), None)


def test_a_starts_wake_up_waits_for_no_reply_and_still_arrives(redis_marks: None) -> None:
    """The wake-up a run's start sends goes on the process's own connection with its replies
    off, so the start waits for no round trip: one wake-up after another on the same connection
    (a reply left unread there would have it replaced). The dispatcher finds each, and a
    connection Redis has closed is replaced before the next one is sent."""
    client = get_redis()
    assert client is not None
    wakeups.wake_unless_saturated("read")
    assert woken()
    sent_on = _unanswered_connection(client)
    assert sent_on is not None, "the wake-up went on no connection of its own"
    for _ in range(2):
        wakeups.wake_unless_saturated("read")
        assert woken()
        assert (_unanswered_connection(client) or {}).get("id") == sent_on["id"], "a reply was left on it"
    wakeups.wake_unless_saturated("read")
    wait_for(
        lambda: (_unanswered_connection(client) or {}).get("cmd") == "eval",
        5,
        "the last wake-up never ran on the connection whose replies are off",
        interval=0.01,
    )
    assert (_unanswered_connection(client) or {}).get("id") == sent_on["id"]
    assert woken()
    client.client_kill_filter(_id=str(sent_on["id"]))
    wait_for(lambda: _unanswered_connection(client) is None, 5, "Redis kept the connection", interval=0.01)
    wakeups.wake_unless_saturated("read")  # on a new connection: none is lost
    assert woken()
    replaced = _unanswered_connection(client)
    assert replaced is not None and replaced["id"] != sent_on["id"]
