"""Wake-ups: "there may be work" hints from whoever makes work ready to whoever admits it.

A wake-up is a hint, never the work itself: the dispatcher re-derives what to admit from the
database and sweeps on a timer as a safety net, so a lost wake-up only delays work by one
sweep. With Redis, a wake-up is a one-element list the dispatcher blocks on (``BLPOP``);
bursts collapse into one element, so a thousand commits cost one round, not a thousand. In
the embedded default (one process) it is a threading.Event.
"""

from __future__ import annotations

import logging
import threading

from django.db import transaction

from core.redis_client import get_redis

logger = logging.getLogger(__name__)

WAKE_KEY = "runwarden:dispatcher:wake"
_local_wake = threading.Event()


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


def wake_on_commit() -> None:
    """Wake the dispatcher once the current transaction commits (never for a rolled-back one)."""
    transaction.on_commit(wake_now)


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
        client.delete(WAKE_KEY)  # collapse a burst that arrived meanwhile into this round
    return woken
