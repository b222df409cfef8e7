"""Handing admitted steps to their lanes' queues (``runs.queueing``): each arrives once, as the
task a worker runs, without declaring anything, those sent together in one write to Redis; a
send the broker refuses loses only its own step (the dispatcher's sweep sends it again) and
never fails the transaction that admitted it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial

import pytest
from django.conf import settings
from django.db import transaction
from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from core.celery import make_app
from core.models import Tenant
from core.redis_client import get_redis
from runs import dispatch, queueing
from runs.executor import step_execute
from runs.models import Run, RunStatus, Step
from runs.services import run_start
from tests.approvals.helpers import sent_to_workers, taken_from_queues
from tests.dialects import postgresql_only

pytestmark = pytest.mark.both_dialects


@pytest.mark.django_db(transaction=True)
def test_a_rounds_admissions_reach_their_lanes_queues_each_once_as_the_step_task(acme: Tenant) -> None:
    sent_to_workers()  # what earlier tests left on the queues
    started = [run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run for _ in range(3)]
    started.append(run_start(tenant=acme, workflow="bench.keyed", input={"key": 1}, actor="t").run)
    admitted = dispatch.admit_round().admitted
    assert {a.step_id for a in admitted} == set(
        Step.objects.filter(run__in=started).values_list("pk", flat=True)
    )
    found = [taken for taken in taken_from_queues() if taken[0] in ("read", "draft")]
    assert sorted(found) == sorted((a.lane, "runs.execute_step", a.step_id, a.token) for a in admitted)
    for _, _, step_id, token in found:  # as the lanes' workers take them
        step_execute(step_id=step_id, token=token)
    assert set(Run.objects.filter(pk__in=[r.pk for r in started]).values_list("status", flat=True)) == {
        RunStatus.SUCCEEDED
    }


@postgresql_only("the broker is Redis there (the embedded default's is in memory)")
def test_a_send_declares_no_queue_and_still_arrives() -> None:
    client = get_redis()
    assert client is not None
    sent_to_workers()
    bindings = [f"_kombu.binding.{lane}" for lane in ("read", "draft")]
    client.delete(*bindings)  # as on a broker no worker of these lanes has declared them on
    queueing.enqueue_steps([(1, 11, "read"), (2, 12, "draft")])
    assert not any(client.exists(key) for key in bindings)  # nothing was declared
    assert sorted(sent_to_workers()) == [(1, 11), (2, 12)]


@pytest.fixture
def broker_refusing_the_read_lane(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The steps' sends go to the real Redis as a user that may write every queue but ``read``:
    a broker that refuses some sends and takes the others."""
    client = get_redis()
    if client is None:
        pytest.skip("the broker is Redis only with REDIS_URL")
    user, password = "rw_test_no_read_lane", "rw-test-only"
    client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "resetkeys", "~draft", "%R~*", "+@all"
    )
    refusing = make_app(set_as_current=False)
    refusing.conf.broker_url = settings.CELERY_BROKER_URL.replace(
        "redis://", f"redis://{user}:{password}@", 1
    )
    monkeypatch.setattr(queueing, "app", refusing)
    try:
        yield
    finally:
        refusing.close()
        client.execute_command("ACL", "DELUSER", user)


@postgresql_only("the broker is Redis there (the embedded default's is in memory)")
@pytest.mark.django_db(transaction=True)
def test_a_send_the_broker_refuses_loses_only_its_own_step_and_never_fails_the_commit(
    broker_refusing_the_read_lane: None,
) -> None:
    sent_to_workers()
    with transaction.atomic():  # the admitting transaction: its sends run once it commits
        transaction.on_commit(
            partial(
                queueing.enqueue_steps, [(1, 11, "read"), (2, 12, "draft"), (3, 13, "read"), (4, 14, "draft")]
            )
        )
    assert sorted(sent_to_workers()) == [(2, 12), (4, 14)]


def lpushes(command: object) -> int:
    """How many LPUSH commands a packed write to Redis carries."""
    chunks = command if isinstance(command, list | tuple) else [command]
    return sum(bytes(chunk).count(b"\r\nLPUSH\r\n") for chunk in chunks)


@pytest.fixture
def writes_to_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The LPUSHes of each write to Redis this test's thread makes (another thread's, such as a
    wake-up's, are not counted); one made before, so that the producer's connection is open."""
    sent_to_workers()
    queueing.enqueue_steps([(1, 11, "read")])
    assert sent_to_workers() == [(1, 11)]
    writes: list[int] = []
    send = AbstractConnection.send_packed_command
    mine = threading.get_ident()

    def counted(connection: AbstractConnection, command: object, check_health: bool = True) -> None:
        if threading.get_ident() == mine:
            writes.append(lpushes(command))
        send(connection, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    yield writes


ADMITTED = [(n, 100 + n, lane) for n, lane in enumerate(["read", "draft"] * 4, start=2)]


@postgresql_only("the broker is Redis there (the embedded default's is in memory)")
def test_a_rounds_sends_go_to_the_broker_in_one_write(writes_to_redis: list[int]) -> None:
    """Many admissions at once (a round, a worker's idle slots) cost one write to Redis, not a
    round trip each; every one still arrives on its lane's queue."""
    queueing.enqueue_steps(ADMITTED)
    assert writes_to_redis == [len(ADMITTED)]
    assert sorted(sent_to_workers()) == sorted((step_id, token) for step_id, token, _ in ADMITTED)


@postgresql_only("the broker is Redis there (the embedded default's is in memory)")
def test_where_the_write_of_them_all_fails_each_is_sent_again_alone(
    writes_to_redis: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection Redis dropped fails the one write of them all (a pipeline is not retried):
    each step is then sent alone, under kombu's reconnect-and-retry, and every one arrives."""
    counting = AbstractConnection.send_packed_command

    def dropped_once(connection: AbstractConnection, command: object, check_health: bool = True) -> None:
        if lpushes(command) > 1 and len(writes_to_redis) == 0:
            writes_to_redis.append(-1)  # the batch's write, lost as on a dropped connection
            connection.disconnect()
            raise RedisConnectionError("connection dropped (the test's)")
        counting(connection, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", dropped_once)
    queueing.enqueue_steps(ADMITTED)
    # After the lost write: a new connection's handshake, then one LPUSH a write.
    assert writes_to_redis[0] == -1
    assert [lpush for lpush in writes_to_redis[1:] if lpush] == [1] * len(ADMITTED)
    assert sorted(sent_to_workers()) == sorted((step_id, token) for step_id, token, _ in ADMITTED)
