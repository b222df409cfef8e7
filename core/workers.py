"""Worker pools announce which queues they consume and how many tasks they run at once.

The dispatcher admits a step only into a free worker slot of its lane, so a step never waits
in the broker behind others while its lease runs (DESIGN: "admission never outruns the
workers"). A pool re-announces every few seconds; an announcement older than ``STALE_AFTER``
is ignored, so a pool that died stops counting on its own. With no announcement at all (a
test calling the dispatcher in-process, or workers that are still starting) admission is
bounded by the caps alone, and leases still start their clock only when a worker picks the
step up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from core.redis_client import get_redis

logger = logging.getLogger(__name__)

POOLS_KEY = "runwarden:worker-pools"
ANNOUNCE_EVERY = 3.0
STALE_AFTER = 10.0

_local_pools: dict[str, tuple[frozenset[str], int, float]] = {}
_local_lock = threading.Lock()
_last_read: tuple[float, list[Pool]] | None = None  # (time.monotonic() of the read, pools)


@dataclass(frozen=True)
class Pool:
    name: str
    queues: frozenset[str]
    slots: int


def pool_announce(*, name: str, queues: Iterable[str], slots: int) -> None:
    global _last_read
    _last_read = None
    record = (frozenset(queues), slots, time.time())
    client = get_redis()
    if client is None:
        with _local_lock:
            _local_pools[name] = record
        return
    payload = json.dumps({"queues": sorted(record[0]), "slots": slots, "at": record[2]})
    client.hset(POOLS_KEY, name, payload)


def pool_withdraw(name: str) -> None:
    global _last_read
    _last_read = None
    client = get_redis()
    if client is None:
        with _local_lock:
            _local_pools.pop(name, None)
        return
    client.hdel(POOLS_KEY, name)


def live_pools(now: float | None = None, *, max_age: float = 0.0) -> list[Pool]:
    """Pools that announced themselves recently. ``max_age``: a read of this process that
    recent will do (a busy worker pulls a step every few milliseconds; pools announce every
    few seconds)."""
    global _last_read
    last = _last_read
    if max_age > 0 and last is not None and time.monotonic() - last[0] < max_age:
        return last[1]
    pools = _read_pools(now)
    if pools is None:
        return []  # Redis is down: admit by caps alone, and ask again next time
    _last_read = (time.monotonic(), pools)
    return pools


def _read_pools(now: float | None) -> list[Pool] | None:
    now = now or time.time()
    client = get_redis()
    if client is None:
        with _local_lock:
            records = dict(_local_pools)
    else:
        try:
            raw = client.hgetall(POOLS_KEY)
        except Exception:
            logger.warning("cannot read worker pools from Redis; admitting by caps only", exc_info=True)
            return None
        records = {}
        for name, value in raw.items():
            data = json.loads(value)
            records[name.decode() if isinstance(name, bytes) else name] = (
                frozenset(data["queues"]),
                int(data["slots"]),
                float(data["at"]),
            )
    return [
        Pool(name, queues, slots)
        for name, (queues, slots, at) in sorted(records.items())
        if now - at <= STALE_AFTER
    ]


# By pool name: the embedded default runs two pools in one process.
_local_queues: dict[str, frozenset[str]] = {}
# By the queues a pool of this process consumes: its slots, and the steps it runs now. A
# process forked from this one (a prefork pool's child) runs one step at a time: it knows none.
_local_slots: dict[frozenset[str], int] = {}
_running_here: Counter[frozenset[str]] = Counter()


def _forget_pools_in_child() -> None:
    global _local_lock
    _local_lock = threading.Lock()  # another thread may have held it at the fork
    _local_slots.clear()


os.register_at_fork(after_in_child=_forget_pools_in_child)


@contextmanager
def slot_taken(queues: frozenset[str]) -> Iterator[None]:
    """A step runs in this process's pool consuming ``queues``, for the block."""
    with _local_lock:
        _running_here[queues] += 1
    try:
        yield
    finally:
        with _local_lock:
            _running_here[queues] -= 1


def idle_local_slots(queues: frozenset[str]) -> int:
    """Slots of this process's pool consuming ``queues`` that run no step now (0 where the
    process does not know its pool's slots: a prefork child, a solo pool's one slot in use)."""
    with _local_lock:
        return max(0, _local_slots.get(queues, 0) - _running_here[queues])


def local_queues(lane: str) -> frozenset[str]:
    """The queues (lanes) consumed by the worker pool of this process that took a task from
    ``lane``: that lane at least (a prefork worker's child does not see what its parent
    announced after forking it); empty outside a worker."""
    if not lane:
        return frozenset()
    pools = tuple(_local_queues.values())  # another pool may be announced or withdrawn meanwhile
    return next((queues for queues in pools if lane in queues), frozenset({lane}))


class Announcer:
    """Keeps announcing a pool from a daemon thread until stopped."""

    def __init__(self, *, name: str, queues: Iterable[str], slots: int) -> None:
        self.name, self.queues, self.slots = name, frozenset(queues), slots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"announce-{name}", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                pool_announce(name=self.name, queues=self.queues, slots=self.slots)
            except Exception:
                logger.warning("could not announce worker pool %s", self.name, exc_info=True)
            if self._stop.wait(ANNOUNCE_EVERY):
                return

    def start(self) -> Announcer:
        _local_queues[self.name] = self.queues
        with _local_lock:
            _local_slots[self.queues] = self.slots
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=ANNOUNCE_EVERY)  # no announcement lands after the withdrawal
        _local_queues.pop(self.name, None)
        with _local_lock:
            _local_slots.pop(self.queues, None)
        try:
            pool_withdraw(self.name)
        except Exception:
            logger.warning("could not withdraw worker pool %s", self.name, exc_info=True)
