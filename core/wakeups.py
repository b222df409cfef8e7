"""Wake-ups: "there may be work" hints from whoever makes work ready to whoever admits it.

A wake-up is a hint, never the work itself: the dispatcher re-derives what to admit from the
database and sweeps on a timer as a safety net, so a lost wake-up only delays work by one
sweep. With Redis, a wake-up is a one-element list the dispatcher blocks on (``BLPOP``);
bursts collapse into one element, so a thousand commits cost one round, not a thousand. In
the embedded default (one process) it is a threading.Event.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from functools import partial
from typing import Any

from django.db import transaction
from redis import Redis
from redis.commands.core import Script

from core.redis_client import get_redis

logger = logging.getLogger(__name__)

WAKE_KEY = "runwarden:dispatcher:wake"
# Set while ready steps wait for room (a lock, a cap, a worker slot): only then does freeing
# room need a round. Set before a round starts and cleared after it when nothing waits, so a
# release that lands during a round still wakes the next one.
WAITING_KEY = "runwarden:dispatcher:waiting"
# What the last round left behind, written inside its transaction (WAITING is also set for the
# whole of a round), or that a step began to wait since (``mark_waiter_added``). A release made
# under the admission lock cannot commit while a round runs, so only this tells it whether a
# round is needed: checking WAITING, it would find every round in progress and wake the next
# one, and a dispatcher and a busy worker would take turns at the admission lock for ever.
LEFT_WAITING_KEY = "runwarden:dispatcher:left_waiting"
# Lanes whose workers are all busy (every slot admitted): their workers take the next ready
# step themselves when they finish one, so new work in them needs no round.
SATURATED_KEY = "runwarden:dispatcher:saturated"
# Counts the steps that began to wait without waking a round (``mark_waiter_added``). A round
# reads it before it looks at the steps, and clears a waiting mark only if it is unchanged then:
# a step that began to wait meanwhile, perhaps unseen by the round, keeps the marks set.
WAITERS_ADDED_KEY = "runwarden:dispatcher:waiters_added"
_local_wake = threading.Event()
_local_waiting = threading.Event()
_local_left_waiting = threading.Event()
_local_saturated: set[str] = set()


def wake_now() -> None:
    """Wake the dispatcher now (outside a transaction, or for work already committed)."""
    _local_wake.set()
    client = get_redis()
    if client is None:
        return
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.rpush(WAKE_KEY, 1)
            pipe.ltrim(WAKE_KEY, -1, -1)
            pipe.execute()
    except Exception:
        logger.warning("could not wake the dispatcher; its sweep will find the work", exc_info=True)


def wake_on_commit(*, only_if_waiting: bool = False, lane: str = "", admission_locked: bool = False) -> None:
    """Wake the dispatcher once the current transaction commits (never for a rolled-back one).

    ``only_if_waiting``: the change only freed room (a finished step's capacity or locks), so
    a round is useful only if some ready step is waiting for room; ``admission_locked``: the
    transaction holds the admission lock, so no round runs while it commits and the last
    round's verdict is the one to go by. ``lane``: the change made a step of that lane ready;
    no round is needed while that lane's workers are all busy.
    """
    if only_if_waiting and admission_locked:
        transaction.on_commit(partial(_wake_if_marked, LEFT_WAITING_KEY, _local_left_waiting))
    elif only_if_waiting:
        transaction.on_commit(partial(_wake_if_marked, WAITING_KEY, _local_waiting))
    elif lane:
        transaction.on_commit(lambda: wake_unless_saturated(lane))
    else:
        transaction.on_commit(wake_now)


# A wake-up that depends on a mark, read and acted on in one round trip (a start over the API
# pays for it on every request).
_WAKE = "redis.call('RPUSH', KEYS[2], 1); redis.call('LTRIM', KEYS[2], -1, -1); return 1"
_WAKE_UNLESS_MEMBER = f"if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end; {_WAKE}"
_WAKE_IF_EXISTS = f"if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end; {_WAKE}"
_scripts: dict[str, Script] = {}


def _wake_by_script(client: Redis, source: str, key: str, *args: str) -> None:
    """Run a conditional wake-up script; if Redis fails it, wake anyway (a wake is only a hint)."""
    try:
        woke = _script(client, source)(keys=[key, WAKE_KEY], args=list(args), client=client)
    except Exception:
        logger.warning("a conditional wake-up failed in Redis; waking the dispatcher anyway", exc_info=True)
        wake_now()
        return
    if woke:
        _local_wake.set()


def wake_unless_saturated(lane: str) -> None:
    """A step of ``lane`` was made ready and has committed: wake the dispatcher, unless every
    worker of the lane is busy (each finishing worker pulls the next ready step itself). Sent
    unanswered (``_Unanswered``): a run's start sends one, and waits for no reply."""
    client = get_redis()
    if client is None:
        if lane not in _local_saturated:
            wake_now()
        return
    if not _unanswered.send(client, "EVAL", _WAKE_UNLESS_MEMBER, 2, SATURATED_KEY, WAKE_KEY, lane):
        _wake_by_script(client, _WAKE_UNLESS_MEMBER, SATURATED_KEY, lane)


class _Unanswered:
    """This process's own connection to Redis with its replies off (``CLIENT REPLY OFF``): what
    is sent on it costs a write, not a round trip. For the wake-up of a run's start: a client
    starting runs one after the other on a busy machine spent an eighth of its time waiting for
    that reply (docs/BENCHMARKS.md). A wake-up is only a hint — the dispatcher's sweep finds what
    a lost one leaves — but an error Redis answers goes unseen here, so one wake-up in every
    ``CONFIRM_EVERY`` seconds is sent with its reply read, on this same connection. Any failure
    (a refused command, a broken connection) turns this path off for ``BACK_OFF`` seconds: the
    wake-ups go with a reply meanwhile."""

    CONFIRM_EVERY = 30.0
    BACK_OFF = 30.0

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Start afresh (a child process after fork(): the parent's connection is the parent's)."""
        self.lock = threading.Lock()
        self.connection: Any = None
        self.pool: Any = None
        self.confirmed = 0.0  # time.monotonic() of the last reply read on it
        self.off_until = 0.0

    @staticmethod
    def name() -> str:
        """Named after its host and process: ``CLIENT LIST`` tells whose it is."""
        return f"runwarden-unanswered-{socket.gethostname()}-{os.getpid()}"

    def send(self, client: Redis, *command: object) -> bool:
        """Send ``command``; False where it was not (the caller sends it with a reply)."""
        if time.monotonic() < self.off_until or not self.lock.acquire(blocking=False):
            return False  # off after a failure, or another thread sending: not worth a wait
        try:
            connection = self._connection(client)
            if time.monotonic() - self.confirmed < self.CONFIRM_EVERY:
                connection.send_packed_command(connection.pack_command(*command))
            else:
                self._confirm(*command)
        except Exception:
            logger.warning("a wake-up could not be sent unanswered; sent with a reply", exc_info=True)
            self._drop()
            self.off_until = time.monotonic() + self.BACK_OFF
            return False
        finally:
            self.lock.release()
        return True

    def delivered(self) -> None:
        """Return once Redis has run everything sent so far: replies on for one command, whose
        answer comes after theirs (for a reader on another connection: a test)."""
        with self.lock:
            if self.connection is None:
                return
            try:
                self._confirm()
            except Exception:
                logger.warning("could not confirm the wake-ups sent unanswered", exc_info=True)
                self._drop()

    def _connection(self, client: Redis) -> Any:
        if self.connection is not None and (self.pool is not client.connection_pool or self._readable()):
            self._drop()
        if self.connection is None:
            pool = client.connection_pool
            # No health checks: their PING would wait for a reply that never comes.
            connection = pool.connection_class(**{**pool.connection_kwargs, "health_check_interval": 0})
            connection.connect()
            self.connection, self.pool = connection, pool
            connection.send_packed_command(connection.pack_command("CLIENT", "SETNAME", self.name()))
            connection.read_response()
            self._replies(on=False)
            self._confirm()  # were OFF refused, the first reply read would be its error
        return self.connection

    def _readable(self) -> bool:
        """Whether anything came in: with its replies off, only Redis closing it (killed,
        restarted) or a push message. Either way a new connection is made (redis-py would
        reconnect a closed one on its own, unnamed and with replies on)."""
        sock = getattr(self.connection, "_sock", None)
        if sock is None:
            return True
        readable = select.poll()  # not select(): a busy web process's descriptors pass 1,024
        readable.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(readable.poll(0))

    def _confirm(self, *command: object) -> None:
        """Replies on for one exchange: ``command`` (if any) sent with its reply read — an error
        Redis answers is raised — after the OK of the replies turned on, which comes once
        everything sent before has run. Then off again."""
        self._replies(on=True)
        if command:
            self.connection.send_packed_command(self.connection.pack_command(*command))
        self.connection.read_response()
        if command:
            self.connection.read_response()
        self._replies(on=False)
        self.confirmed = time.monotonic()

    def _replies(self, *, on: bool) -> None:
        self.connection.send_packed_command(
            self.connection.pack_command("CLIENT", "REPLY", "ON" if on else "OFF")
        )

    def _drop(self) -> None:
        if self.connection is not None:
            with suppress(Exception):
                self.connection.disconnect()
        self.connection = None


_unanswered = _Unanswered()
os.register_at_fork(after_in_child=_unanswered.forget)


def wake_ups_delivered() -> None:
    """Return once Redis has run every wake-up this process sent unanswered."""
    _unanswered.delivered()


def _wake_if_marked(key: str, local: threading.Event) -> None:
    """Wake the dispatcher if the mark ``key`` (``local`` without Redis) is set, or unknown."""
    client = get_redis()
    if client is None:
        if local.is_set():
            wake_now()
        return
    _wake_by_script(client, _WAKE_IF_EXISTS, key)


def mark_waiter_added() -> bool:
    """A step that has committed waits for room, and no round is woken for it (a key held
    elsewhere: ``runs.locking.wake_for_ready_step``): the waiting marks are set, so what frees
    room wakes a round, and a round in progress, which may not have seen the step, will not
    clear them. False where Redis does not keep the marks (or failed them): then a round must
    be woken for the step."""
    client = get_redis()
    if client is None:
        return False
    try:
        _script(client, _WAITER_ADDED)(keys=[WAITERS_ADDED_KEY, WAITING_KEY, LEFT_WAITING_KEY], client=client)
    except Exception:
        logger.warning("could not mark a step waiting for its key; waking the dispatcher", exc_info=True)
        return False
    return True


def waiters_added() -> str | None:
    """How many steps have begun to wait without a round (read by a round before it looks at
    the steps, for ``mark_left_waiting`` and ``mark_waiting``); None without Redis."""
    client = get_redis()
    if client is None:
        return None
    try:
        added = client.get(WAITERS_ADDED_KEY)
    except Exception:
        logger.warning("could not read the steps begun to wait; the round keeps the marks", exc_info=True)
        return UNKNOWN_COUNT
    return added.decode() if isinstance(added, bytes) else str(added or 0)


# No count is ever this: a round that could not read the count clears no mark.
UNKNOWN_COUNT = "unknown"


_WAITER_ADDED = (
    "redis.call('INCR', KEYS[1]); redis.call('SET', KEYS[2], 1); redis.call('SET', KEYS[3], 1); return 1"
)
# Clear a mark only if no step began to wait since the round read the count.
_CLEAR_UNLESS_ADDED = (
    "if (redis.call('GET', KEYS[1]) or '0') == ARGV[1] then redis.call('DEL', KEYS[2]) end; return 1"
)


def _script(client: Redis, source: str) -> Script:
    script = _scripts.get(source)
    if script is None:
        script = _scripts[source] = client.register_script(source)
    return script


def _clear_mark(client: Redis, pipe: Any, key: str, since: str | None) -> None:
    """Clear the mark ``key`` (in ``pipe``, of ``client``), unless a step began to wait after
    ``since``."""
    if since is None:
        pipe.delete(key)
    else:
        _script(client, _CLEAR_UNLESS_ADDED)(keys=[WAITERS_ADDED_KEY, key], args=[since], client=pipe)


def mark_left_waiting(waiting: bool, *, since: str | None = None) -> None:
    """A round says, inside its transaction (before any release under the admission lock can
    commit after it), whether it left ready steps waiting for room. ``since``: the count of
    ``waiters_added`` the round read before it looked at the steps."""
    if waiting:
        _local_left_waiting.set()
    else:
        _local_left_waiting.clear()
    client = get_redis()
    if client is None:
        return
    try:
        if waiting:
            client.set(LEFT_WAITING_KEY, 1)
        else:
            _clear_mark(client, client, LEFT_WAITING_KEY, since)
    except Exception:
        logger.warning("could not record what a round left waiting", exc_info=True)


def mark_waiting(waiting: bool, saturated: set[str] | None = None, *, since: str | None = None) -> None:
    """The dispatcher says whether ready steps are left waiting for room a release may free,
    and (after a round) which lanes have every worker slot taken. ``since``: as for
    ``mark_left_waiting``."""
    if waiting:
        _local_waiting.set()
    else:
        _local_waiting.clear()
    if saturated is not None:
        _local_saturated.clear()
        _local_saturated.update(saturated)
    client = get_redis()
    if client is None:
        return
    try:
        with client.pipeline(transaction=True) as pipe:
            if waiting:
                pipe.set(WAITING_KEY, 1)
            else:
                _clear_mark(client, pipe, WAITING_KEY, since)
            if saturated is not None:
                pipe.delete(SATURATED_KEY)
                if saturated:
                    pipe.sadd(SATURATED_KEY, *sorted(saturated))
            pipe.execute()
    except Exception:
        logger.warning("could not record whether steps wait; every release will wake", exc_info=True)


def mark_unsaturated(lanes: Iterable[str]) -> None:
    """A worker of these lanes found nothing to pull: new work there needs a round again."""
    lanes = sorted(lanes)
    if not lanes:
        return
    _local_saturated.difference_update(lanes)
    client = get_redis()
    if client is None:
        return
    try:
        client.srem(SATURATED_KEY, *lanes)
    except Exception:
        logger.warning("could not clear saturated lanes", exc_info=True)


def wait_for_wake(timeout: float) -> bool:
    """Block until a wake-up arrives or ``timeout`` seconds pass. True when woken."""
    client = get_redis()
    if client is None:
        woken = _local_wake.wait(timeout)
        _local_wake.clear()
        return woken
    try:
        woken = client.blpop([WAKE_KEY], timeout=max(timeout, 0.01)) is not None
    except Exception:
        logger.warning("Redis unavailable for wake-ups; sweeping on the timer", exc_info=True)
        _local_wake.wait(timeout)
        return False
    if woken:
        try:
            client.delete(WAKE_KEY)  # collapse a burst that arrived meanwhile into this round
        except Exception:  # Redis lost just after the wake-up: the round runs all the same
            logger.warning(
                "could not collapse the wake-ups waiting; the next round may run sooner", exc_info=True
            )
    return woken
