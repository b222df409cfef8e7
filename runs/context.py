"""What a step body gets: its identity, its inputs, and the safe way to act on the world."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from django.db import connection, connections, transaction

from core.connections import BoundConnection, connection_for_run
from core.leases import LeaseGrant, StaleToken, leases_renew, locks_acquire
from runs.gates import GateVerdict, get_gate
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step

logger = logging.getLogger(__name__)


class StepInterrupted(Exception):
    """The step must stop: its lease was lost or its run was cancelled."""


class LeaseLost(StepInterrupted):
    pass


class StepTimedOut(BaseException):  # noqa: N818 — a BaseException, so no ``except Exception`` swallows it
    """Raised inside a step body that ran past its timeout. Not an ``Exception``: the ledger
    must not record an effect interrupted by it as failed (it may have happened)."""


class RunCancelled(StepInterrupted):
    pass


@dataclass
class StepContext:
    """Handed to every step body.

    ``ctx.effect(kind, fn)`` is the only way a step should touch the outside world: the ledger
    makes a retry return the recorded result instead of acting twice. ``ctx.heartbeat()``
    renews the step's leases (a background thread also does so while the body runs) and raises
    StepInterrupted when the step must stop. ``ctx.checkpoint(data)`` saves progress that a
    take-over resumes from (``ctx.checkpoint_data``).
    """

    run: Run
    step: Step
    lease: LeaseGrant
    lease_seconds: float
    input: dict[str, Any]
    outputs: dict[str, Any]
    checkpoint_data: Any = None
    locks: list[LeaseGrant] = field(default_factory=list)
    approval: GateVerdict | None = None
    deadline_seconds: float = 300.0
    backend_pid: int | None = None  # the PostgreSQL backend the body's queries run on
    timed_out: threading.Event = field(default_factory=threading.Event)
    _lost: threading.Event = field(default_factory=threading.Event)
    _grants_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def step_key(self) -> str:
        return self.step.key

    @property
    def attempt(self) -> int:
        return self.step.attempt

    @property
    def correlation_id(self) -> str:
        return self.run.correlation_id

    def committed_effects(self, step_key: str) -> dict[str, Any]:
        """The recorded results of a step's committed effects, by kind (what a compensation
        undoes)."""
        rows = SideEffect.objects.filter(
            run_id=self.run.id, step__key=step_key, status=EffectStatus.COMMITTED
        ).order_by("committed_at", "id")
        return dict(rows.values_list("kind", "result"))

    def in_flight_effects(self, step_key: str) -> list[str]:
        """Kinds of a step's effects proposed with no outcome yet."""
        rows = SideEffect.objects.filter(run_id=self.run.id, step__key=step_key, status=EffectStatus.PROPOSED)
        return sorted(rows.values_list("kind", flat=True))

    @property
    def environment(self) -> str:
        return self.run.environment

    def connection(self, provider: str) -> BoundConnection:
        """The ``provider`` connection this run bound when it started (its tenant's and its
        environment's, never another's). Raises ConnectionNotBound when it bound none."""
        bound = connection_for_run(
            tenant_id=self.run.tenant_id,
            environment=self.run.environment,
            binding=self.run.connections or {},
            provider=provider,
        )
        return replace(bound, run_id=self.run.id, correlation_id=self.run.correlation_id)

    @property
    def tenant_id(self) -> int:
        return self.run.tenant_id

    @property
    def approved_content(self) -> Any:
        """The content of the artifact version a human approved (gated steps only)."""
        if self.approval is None:
            raise RuntimeError(f"step {self.step_key} is not gated by an approval")
        return self.approval.content

    @property
    def token(self) -> int:
        """The fencing token of the step's lease."""
        return self.lease.token

    def grants(self) -> list[LeaseGrant]:
        with self._grants_lock:
            return [self.lease, *self.locks]

    def renew(self) -> None:
        """Renew every lease this step holds; remember if one was lost."""
        try:
            renewed = leases_renew(grants=self.grants(), ttl=self.lease_seconds)
        except StaleToken:
            self._lost.set()
            raise
        with self._grants_lock:
            self.lease, self.locks = renewed[0], renewed[1:]

    def heartbeat(self) -> None:
        """Prove the step still owns its work; raise StepInterrupted if it does not."""
        if self.timed_out.is_set():
            raise LeaseLost(f"step {self.step_key} of {self.run_id} timed out")
        if self._lost.is_set():
            raise LeaseLost(f"step {self.step_key} of {self.run_id} lost its lease")
        status = Run.objects.filter(pk=self.run.pk).values_list("status", flat=True).first()
        if status == RunStatus.CANCELLED and not self.step.compensates:  # compensations go on
            raise RunCancelled(f"run {self.run_id} was cancelled")
        try:
            self.renew()
        except StaleToken:
            raise LeaseLost(f"step {self.step_key} of {self.run_id} lost its lease") from None

    def lock(self, *keys: str, policy: str = "wait", wait_timeout: float = 30.0) -> None:
        """Take entity locks for the rest of the step (released when it finishes)."""
        grants = locks_acquire(
            tenant_id=self.tenant_id,
            keys=keys,
            holder=f"{self.run_id}:{self.step_key}",
            ttl=self.lease_seconds,
            metadata={"run_id": self.run_id, "step_id": self.step.pk, "step_key": self.step_key},
            policy=policy,
            wait_timeout=wait_timeout,
        )
        with self._grants_lock:
            self.locks.extend(grants)

    def effect(
        self,
        kind: str,
        fn: Callable[[], Any],
        *,
        request: dict[str, Any] | None = None,
        key: str = "",
        external_ref: Callable[[Any], str] | None = None,
    ) -> Any:
        """Run a side effect through the ledger; a retry gets the recorded result back."""
        from runs.ledger import effect_execute

        self.heartbeat()
        verdict = self.approval
        outcome = effect_execute(
            run=self.run,
            step=self.step,
            kind=kind,
            fn=fn,
            request=request,
            idempotency_key=key,
            lease=self.lease,
            external_ref=external_ref,
            # An approved step acts only while its approval still holds for the latest version.
            guard=(lambda: get_gate().guard_effect(step=self.step, verdict=verdict)) if verdict else None,
        )
        return outcome.result

    def checkpoint(self, data: Any) -> None:
        from runs.services import step_checkpoint

        self.heartbeat()
        step_checkpoint(step=self.step, lease=self.lease, data=data)
        self.checkpoint_data = data


class Heartbeat:
    """Renews a step's leases in the background while its body runs, until the step's timeout:
    then it stops renewing and calls ``on_timeout`` (which releases what the step holds)."""

    def __init__(self, ctx: StepContext, on_timeout: Callable[[StepContext], None] | None = None) -> None:
        self.ctx = ctx
        self.on_timeout = on_timeout
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

    def renew(self) -> bool:
        """Renew the step's leases (False: they are lost; watch it no more). A renewal that
        waits for a row lock gives up after a while and is tried again at the next beat, so
        one stuck renewal cannot hold up the others of this process for long."""
        try:
            with transaction.atomic():
                if connection.vendor == "postgresql":
                    with connection.cursor() as cursor:
                        cursor.execute(f"SET LOCAL lock_timeout = '{RENEWAL_LOCK_TIMEOUT_MS}ms'")
                self.ctx.renew()
        except StaleToken:
            if not self.finished:
                logger.warning("step %s lost its lease; stopping heartbeats", self.ctx.step.pk)
            return False
        except Exception:
            logger.warning("heartbeat of step %s failed; trying again", self.ctx.step.pk, exc_info=True)
        self.next_beat = time.monotonic() + self.interval
        return True

    def _time_out(self) -> None:
        try:
            assert self.on_timeout is not None
            self.on_timeout(self.ctx)
        except Exception:
            logger.exception("stopping step %s past its timeout failed", self.ctx.step.pk)
        finally:
            connections.close_all()


RENEWAL_LOCK_TIMEOUT_MS = 2000


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
            # Outside the lock: a renewal is a round trip to the database. Timeouts first, so a
            # slow renewal never delays stopping a step.
            for heartbeat in sorted(due, key=lambda h: not h.overdue):
                try:
                    if heartbeat.overdue:
                        heartbeat.time_out()
                        self.unwatch(heartbeat)
                    elif not heartbeat.renew():
                        self.unwatch(heartbeat)
                except Exception:  # this thread must outlive any one step's trouble
                    logger.exception("heartbeat of step %s failed", heartbeat.ctx.step.pk)
            connections.close_all()  # this thread's connection is idle until the next beat


_watcher = _Watcher()


def _new_watcher_after_fork() -> None:
    global _watcher
    _watcher = _Watcher()  # the parent's thread and lock do not come along into a child


os.register_at_fork(after_in_child=_new_watcher_after_fork)
