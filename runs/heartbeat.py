"""The engine's watch over running steps: one thread per process renews the leases of every
step running in it and stops those past their timeout. A step body never sees this module;
it sees ``runs.context.StepContext``."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable

from django.db import connections, transaction
from django.utils import timezone

from core.leases import LeaseGrant, leases_renew_many
from runs.context import StepContext

logger = logging.getLogger(__name__)


class Heartbeat:
    """Renews a step's leases in the background while its body runs, until the step's timeout:
    then it stops renewing and calls ``on_timeout`` (which releases what the step holds). When
    a renewal finds the leases gone (the run was cancelled, the step taken over), it calls
    ``on_lost``, which may stop the body at once rather than at its next call."""

    def __init__(
        self,
        ctx: StepContext,
        on_timeout: Callable[[StepContext], None] | None = None,
        on_lost: Callable[[StepContext], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.on_timeout = on_timeout
        self.on_lost = on_lost
        self.interval = max(ctx.lease_seconds / 3, 0.05)
        now = time.monotonic()
        self.deadline = now + ctx.deadline_seconds
        self.next_beat = now + self.interval
        self.finished = False  # the body returned: a renewal in flight may find the leases released
        self.stopping: threading.Thread | None = None
        self.lock = threading.Lock()  # between the body's return and the step's stop

    @property
    def due(self) -> float:
        return min(self.next_beat, self.deadline)

    @property
    def overdue(self) -> bool:
        return time.monotonic() >= self.deadline

    def __enter__(self) -> Heartbeat:
        _watcher.watch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.finished = True
            stopping = self.stopping
        _watcher.unwatch(self)
        if stopping is not None:
            # The step was being stopped as its body returned: let that commit first, so the
            # caller sees the step as the stop left it.
            stopping.join(5)

    def time_out(self) -> None:
        """Stop the step past its timeout, on a thread of its own: that takes the step's row
        locks, which a hung body may hold, and the other steps here must still be renewed."""
        with self.lock:
            if self.finished or self.on_timeout is None:
                return  # it returned in time after all: its own end records it
            logger.warning("step %s ran past its timeout; stopping it", self.ctx.step.pk)
            self.stopping = threading.Thread(
                target=self._time_out, name=f"timeout-{self.ctx.step.pk}", daemon=True
            )
            self.stopping.start()

    def renewed(self, grants: list[LeaseGrant] | None) -> bool:
        """Take a renewal's outcome: the step's grants renewed, or None when they are lost (then
        the step is told, and False: watch it no more)."""
        self.ctx.renewed(grants)
        if grants is None:
            if not self.finished:
                logger.warning("step %s lost its lease; stopping heartbeats", self.ctx.step.pk)
                if self.on_lost is not None:
                    self.on_lost(self.ctx)
            return False
        self.next_beat = time.monotonic() + next_beat_in(self.interval, grants)
        return True

    def _time_out(self) -> None:
        try:
            assert self.on_timeout is not None
            self.on_timeout(self.ctx)
        except Exception:
            logger.exception("stopping step %s past its timeout failed", self.ctx.step.pk)
        finally:
            connections.close_all()


# How soon a lease a renewal passed over (a write had it locked: milliseconds) is tried again.
PASSED_OVER_RETRY_SECONDS = 0.25


def next_beat_in(interval: float, grants: list[LeaseGrant]) -> float:
    """Seconds to the next renewal of these leases: the interval when every one was just
    renewed (a lease lasts three intervals), else soon — a lease a renewal passed over, a write
    having it locked, is tried again well before it runs out."""
    left = min(((grant.expires_at - timezone.now()).total_seconds() for grant in grants), default=math.inf)
    if left >= 2.5 * interval:
        return interval
    return max(min(left / 3, PASSED_OVER_RETRY_SECONDS), 0.05)


class _Watcher:
    """One thread per process renews the leases of every step running in it and stops those
    past their timeout. (A thread per step cost a start and a join on every step.) Watching a
    step wakes the thread only when the step is due before the thread's next wake-up."""

    IDLE_SECONDS = 60.0

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.watched: dict[int, Heartbeat] = {}
        self.wake_at = math.inf  # -inf while the thread is busy: it looks again before it sleeps
        self.thread: threading.Thread | None = None

    def watch(self, heartbeat: Heartbeat) -> None:
        with self.cond:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
                self.thread.start()
            self.watched[id(heartbeat)] = heartbeat
            if heartbeat.due < self.wake_at:
                self.cond.notify()

    def unwatch(self, heartbeat: Heartbeat) -> None:
        with self.cond:
            self.watched.pop(id(heartbeat), None)

    def _run(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                due = [h for h in self.watched.values() if h.due <= now]
                if not due:
                    self.wake_at = min(
                        (h.due for h in self.watched.values()), default=now + self.IDLE_SECONDS
                    )
                    self.cond.wait(self.wake_at - now)
                    self.wake_at = -math.inf
                    continue
                # Renewed with them: the steps due within half a beat (early is harmless), so the
                # steps of a busy process fall into step and share one statement per beat.
                soon = [
                    h for h in self.watched.values() if not h.overdue and h.next_beat - now <= h.interval / 2
                ]
            # Outside the lock: a renewal is a round trip to the database. Timeouts first, so a
            # slow renewal never delays stopping a step.
            for heartbeat in (h for h in due if h.overdue):
                try:
                    heartbeat.time_out()
                except Exception:  # this thread must outlive any one step's trouble
                    logger.exception("stopping step %s failed", heartbeat.ctx.step.pk)
                self.unwatch(heartbeat)
            self._renew_together([h for h in soon if not h.overdue])
            connections.close_all()  # this thread's connection is idle until the next beat

    def _renew_together(self, heartbeats: list[Heartbeat]) -> None:
        """Renew the leases of these steps in one statement (``leases_renew_many``). It waits
        for no row lock: a lease locked by a write in progress is renewed at a later beat, well
        before it runs out (``Heartbeat.renewed``)."""
        if not heartbeats:
            return
        try:
            with transaction.atomic():
                # Each step's own leases, then (apart: a call ending meanwhile loses nothing)
                # the slots and locks of its governed calls in progress.
                calls = [(h, grants) for h in heartbeats if (grants := h.ctx.call_grants())]
                renewed = leases_renew_many(
                    [(h.ctx.grants(), h.ctx.lease_seconds) for h in heartbeats]
                    + [(grants, h.ctx.lease_seconds) for h, grants in calls]
                )
        except Exception:
            logger.warning(
                "renewing the leases of %d steps failed; trying again", len(heartbeats), exc_info=True
            )
            return
        for heartbeat, outcome in zip(heartbeats, renewed, strict=False):
            if not heartbeat.renewed(outcome):
                self.unwatch(heartbeat)
        for (heartbeat, _), outcome in zip(calls, renewed[len(heartbeats) :], strict=True):
            heartbeat.ctx.call_grants_renewed(outcome)
            if outcome:  # a call's lease passed over beats again as early as a step's would
                heartbeat.next_beat = min(
                    heartbeat.next_beat, time.monotonic() + next_beat_in(heartbeat.interval, outcome)
                )


_watcher = _Watcher()


def _new_watcher_after_fork() -> None:
    global _watcher
    _watcher = _Watcher()  # the parent's thread and lock do not come along into a child


os.register_at_fork(after_in_child=_new_watcher_after_fork)
