"""The dispatcher process: admits ready steps, reaps lost admissions, re-sends lost tasks.

Several may run (``python manage.py dispatcher`` on two hosts); exactly one is active: it
holds a session-level PostgreSQL advisory lock on a connection of its own. If it dies, its
connection closes, PostgreSQL drops the lock, and a standby — which tries every
``STANDBY_POLL_SECONDS`` — takes over. Every round also takes a transaction-level lock (see
``runs.dispatch``), so even two processes that both believe they are active never admit at
the same time.

The active dispatcher blocks on wake-ups (``core.wakeups``), so a step that becomes ready is
admitted within milliseconds, and sweeps every ``RUNWARDEN_DISPATCH_SWEEP_SECONDS`` as the
safety net for a lost wake-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from core import rawsql
from core.wakeups import wait_for_wake
from runs.dispatch import dispatch_until_idle
from runs.reaper import reap_expired_steps, resend_unstarted

logger = logging.getLogger(__name__)

ACTIVE_LOCK_ID = 7_411_002
STANDBY_POLL_SECONDS = 1.0


class ActiveRole:
    """The session-level advisory lock that makes one dispatcher the active one."""

    def __init__(self) -> None:
        self._conn: Any = None

    def try_take(self) -> bool:
        if not rawsql.on_postgresql():
            return True  # the embedded default runs one dispatcher
        try:
            if self._conn is None:
                self._conn = connection.copy()
                self._conn.ensure_connection()
                self._conn.connection.autocommit = True
            with self._conn.connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", [ACTIVE_LOCK_ID])
                return bool(cursor.fetchone()[0])
        except Exception:
            logger.warning("cannot reach PostgreSQL for the dispatcher lock", exc_info=True)
            self.drop()
            return False

    def still_held(self) -> bool:
        """The lock lives as long as its connection: check that the connection answers."""
        if not rawsql.on_postgresql():
            return True
        try:
            with self._conn.connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return True
        except Exception:
            logger.warning("lost the dispatcher lock's connection; standing by", exc_info=True)
            self.drop()
            return False

    def drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


def run_dispatcher(stop: threading.Event, *, name: str = "") -> None:
    """Dispatch until ``stop`` is set: stand by, or admit, reap and re-send while active."""
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    role = ActiveRole()
    with rawsql.prepared_statements():  # one connection, the same statements every round
        _dispatch_until_stopped(stop, name, role)
    role.drop()


def _dispatch_until_stopped(stop: threading.Event, name: str, role: ActiveRole) -> None:
    sweep = float(settings.RUNWARDEN_DISPATCH_SWEEP_SECONDS)
    reap_every = float(settings.RUNWARDEN_REAP_EVERY_SECONDS)
    active = False
    next_maintenance = 0.0
    while not stop.is_set():
        if not active:
            active = role.try_take()
            if not active:
                stop.wait(STANDBY_POLL_SECONDS)
                continue
            logger.info("dispatcher %s is active", name)
        try:
            close_old_connections()
            result = dispatch_until_idle()
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + reap_every
                if not role.still_held():
                    active = False
                    continue
                reaped = reap_expired_steps()
                resent = resend_unstarted()
                if any(reaped.values()) or resent:
                    logger.info("reaper: %s, re-sent %d", reaped, resent)
                    result = dispatch_until_idle()
        except Exception:
            # The database or Redis may be restarting: say so, wait a moment, carry on.
            logger.exception("dispatch round failed; retrying")
            connection.close()
            stop.wait(1.0)
            continue
        timeout = sweep
        if result.next_due is not None:  # a backoff ends before the next sweep: be there
            timeout = min(timeout, max((result.next_due - timezone.now()).total_seconds(), 0.005))
        wait_for_wake(timeout)


def start_embedded() -> threading.Thread:
    """The embedded default: the dispatcher as a thread of the one process."""
    stop = threading.Event()
    thread = threading.Thread(target=run_dispatcher, args=(stop,), name="runwarden-dispatcher", daemon=True)
    thread.start()
    return thread
