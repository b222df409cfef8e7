"""Running one admitted step on a worker.

Who runs a step is decided by its lease, never by the broker: a task carries the fencing
token the dispatcher granted, and ``step_execute`` starts only if that token still owns the
step. A redelivered or duplicated task therefore exits without running, and every write a
step makes back to Runwarden is fenced by the same token.

A step costs two transactions here: the start (leased → running, its leases renewed to the
step's own lease length, its inputs read) and the end (one fenced transaction that records
the outcome, releases the leases and readies the next step).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from django.conf import settings
from django.db import connection, connections, transaction
from django.utils import timezone

from core import coordination, logs, rawsql, tracing
from core.leases import StaleToken, fenced_write, leases_renew
from core.validation import json_unstorable_reason
from core.wakeups import wake_on_commit
from core.workers import idle_local_slots, slot_taken
from runs import gates, transitions
from runs.context import AsyncStepContext, StepContext
from runs.definitions import StepSpec, UnknownWorkflow, get_workflow
from runs.dispatch import (
    Admission,
    Candidate,
    Place,
    admission_shard_sql,
    admit_here,
    shard_headroom,
    worker_idle,
)
from runs.gates import GateVerdict
from runs.heartbeat import Heartbeat
from runs.interrupts import LeaseLost, Rejected, RunCancelled, StepParked, StepTimedOut
from runs.ledger import EffectRequestMismatch, EffectUnresolved
from runs.locking import step_row_lock
from runs.models import EffectStatus, SideEffect, Step, StepStatus
from runs.services import contract_remember, step_outputs
from runs.tools import CallDiverged

logger = logging.getLogger(__name__)


class _Start:
    """What the start transaction found out."""

    def __init__(
        self, outcome: str = "", ctx: StepContext | None = None, spec: StepSpec | None = None
    ) -> None:
        self.outcome = outcome
        self.ctx = ctx
        self.spec = spec


def _start(step_id: int, token: int) -> _Start:
    """leased → running in one transaction, or the reason the step does not run here."""
    try:
        with transaction.atomic():
            return _begin(step_id, token)
    except StaleToken:
        return _Start("stale")  # the admission expired before a worker got to it; admitted anew


def _begin(
    step_id: int,
    token: int,
    outputs: dict[str, Any] | None = None,
    started: transitions.Started | None = None,
) -> _Start:
    """The start of an attempt, in the caller's transaction: leased → running, leases renewed
    to the step's own length (StaleToken if they ran out), a gated step parked or let through.
    ``outputs``: the earlier steps' outputs when the caller already has them. ``started``: the
    step as the statement that admitted it in this transaction also started it (running, its
    leases of the default length: nothing is renewed, ``_starts_at_once``)."""
    default_ttl = settings.RUNWARDEN_DEFAULT_LEASE_SECONDS
    if started is not None:
        step, run, grants = started.step, started.run, started.grants
        assert step.started_at is not None  # written by the statement that started it
        now = step.started_at
    else:
        now = timezone.now()
        # Raises StaleToken if the admission's lease already ran out (the step is admitted anew).
        begun = transitions.step_attempt_start(step_id=step_id, token=token, now=now, ttl=default_ttl)
        if begun is None:
            return _Start("not-ours")  # a duplicate delivery, a cancelled run, a reaped admission
        step, run, grants = begun
    contract_remember(run)  # its events carry it without reading it again

    def fail(reason: str, outcome: str = "failed") -> _Start:
        transitions.step_fail(
            step=step, actor="executor", reason=reason, from_statuses=[StepStatus.RUNNING], grants=grants
        )
        return _Start(outcome)

    try:
        definition = get_workflow(run.workflow, run.workflow_version)
        spec = definition.spec(step.key)
    except UnknownWorkflow as exc:
        return fail(str(exc))
    lease_seconds = spec.lease_seconds or default_ttl
    if lease_seconds != default_ttl:  # a step with a lease length of its own
        grants = leases_renew(grants=grants, ttl=lease_seconds, now=now)
    if outputs is None:
        outputs = step_outputs(run, before_position=step.position) if step.position else {}
    seen = transitions.started_from(run, outputs)
    if transitions.step_inputs_changed(step, seen):  # never run on changed inputs silently
        transitions.step_conflict(
            step=step,
            kind="changed_inputs",
            error="its inputs changed since an earlier attempt started",
            grants=grants,
            from_statuses=[StepStatus.RUNNING],
            current=seen,
            proposed=step.started_from,
        )
        return _Start("conflict")
    verdict = None
    if spec.approval is not None:
        draft = list(outputs.values())[-1] if outputs else None
        try:
            verdict = gates.get_gate().check(run=run, step=step, spec=spec, draft=draft)
        except gates.NoGate as exc:
            return fail(str(exc))
        # Parked in this same transaction: a decision that commits after it always finds
        # the step waiting, so it can never be missed.
        if verdict.state == "waiting":
            transitions.step_park(step=step, grants=grants, approval_id=verdict.approval_id)
            return _Start("waiting_approval")
        if verdict.state == "rejected":
            return fail(f"rejected: {verdict.reason}", outcome="rejected")
    ctx = StepContext(
        run=run,
        step=step,
        lease=grants[0],
        lease_seconds=lease_seconds,
        input=dict(run.input),
        outputs=outputs,
        checkpoint_data=step.checkpoint,
        locks=grants[1:],
        approval=verdict,
        approval_guard=_approval_guard(step, verdict) if verdict is not None else None,
        started_from=seen,
        deadlock_policy=definition.deadlock_policy,
        deadline_seconds=spec.timeout_seconds,
        # The connection a plain body's own queries share, for cancelling one past the timeout:
        # only where the body can be stopped by a signal (the main thread of a prefork or solo
        # worker, ``_interruptible``), where this start and the body share the thread.
        backend_pid=(
            connection.connection.get_backend_pid()
            if rawsql.on_postgresql() and threading.current_thread() is threading.main_thread()
            else None
        ),
    )
    return _Start(ctx=ctx, spec=spec)


def _approval_guard(step: Step, verdict: GateVerdict) -> Callable[[], None]:
    """Run as an approved step's effect is proposed: raises if the approval no longer holds for
    the artifact's latest version (it was edited or invalidated since)."""
    return lambda: gates.get_gate().guard_effect(step=step, verdict=verdict)


def step_execute(*, step_id: int, token: int, lanes: frozenset[str] = frozenset()) -> str:
    """Run one admitted step and, when ``lanes`` (the queues this worker consumes) allow it,
    go straight on with the next step it is handed as it finishes (the run's next step, its
    start folded into that same transaction, or another ready step of its lanes). Returns
    what happened to the last step run (for logs and tests)."""
    with slot_taken(lanes):  # this pool's idle slots are what a finishing step may pull for
        if not coordination.steps_do_their_own():  # the coordination threads prepare their own
            return _execute_chain(step_id, token, lanes)
        with rawsql.prepared_statements():  # a chain runs the same statements step after step
            return _execute_chain(step_id, token, lanes)


def _execute_chain(step_id: int, token: int, lanes: frozenset[str]) -> str:
    # Every database transaction of the chain runs where this process does its database work
    # (core.coordination: a coordination thread when steps run on threads); the bodies run here.
    start = coordination.run(_start, step_id, token)
    outcome = start.outcome
    # A worker goes on for a while, not forever: the task ends well inside Celery's time
    # limits, and the broker's next message for this worker is not left waiting long.
    go_on_until = time.monotonic() + settings.RUNWARDEN_WORKER_CHAIN_SECONDS
    while start.ctx is not None and start.spec is not None:
        pull = lanes if time.monotonic() < go_on_until else frozenset()
        outcome, following = _carry_out(start.ctx, start.spec, pull)
        if following is None:
            break
        start = (
            following
            if isinstance(following, _Start)
            else coordination.run(_start, following.step_id, following.token)
        )
        outcome = start.outcome
    if lanes:
        coordination.run(
            worker_idle, lanes
        )  # nothing more to pull here: new work in these lanes needs a round
    return outcome


def _carry_out(
    ctx: StepContext, spec: StepSpec, lanes: frozenset[str]
) -> tuple[str, _Start | Admission | None]:
    fields = {
        "run_id": ctx.run_id,
        "step_key": ctx.step_key,
        "attempt": ctx.attempt,
        "tenant": ctx.run.tenant_id,
        "correlation_id": ctx.correlation_id,
        "lease_token": ctx.lease.token,
    }
    if trace_id := tracing.trace_id_of(ctx.run.traceparent):
        fields["trace_id"] = trace_id
    attempt_attributes = (
        {
            "runwarden.run_id": ctx.run_id,
            "runwarden.step_key": ctx.step_key,
            "runwarden.lane": spec.lane,
            "runwarden.attempt": ctx.attempt,
            "runwarden.lease_token": ctx.lease.token,
            "runwarden.worker": transitions.worker_id(),
        }
        if tracing.enabled()
        else {}
    )
    with (
        logs.step_context(**fields),
        tracing.span_in_run(ctx.run.traceparent, f"step {ctx.step_key}", attempt_attributes) as span,
    ):
        logger.debug("step started")
        body = _run_body(ctx, spec)
        finished: tuple[str, _Start | Admission | None] = (
            (body, None)
            if isinstance(body, str)
            else coordination.run(_finish_succeeded, ctx, body.output, lanes)
        )
        outcome = finished[0]
        span.set_attribute("runwarden.outcome", outcome)
        if outcome in _FAILED_OUTCOMES:
            tracing.mark_failed(span, outcome)
        logger.info("step ended: %s", outcome, extra={"outcome": outcome})
        return finished


# How an attempt ended that its span shows as an error.
_FAILED_OUTCOMES = frozenset({"failed", "retrying", "conflict", "timed-out", "lease-lost"})


class _Output:
    def __init__(self, output: Any) -> None:
        self.output = output


def _run_body(ctx: StepContext, spec: StepSpec) -> str | _Output:
    """Run the body; a string says how the step ended otherwise."""
    try:
        if inspect.iscoroutinefunction(spec.body):
            with Heartbeat(ctx, on_timeout=_time_out, on_lost=_stop_on_lost):
                output = _run_async_body(ctx, spec.body)  # an async body
        else:
            with Heartbeat(ctx, on_timeout=_time_out), _interruptible(ctx):
                output = spec.body(ctx)  # a plain body
    except StepTimedOut:
        return "timed-out"
    except StepParked:
        return "waiting_approval"  # a governed call parked it, holding nothing (runs.tools)
    except RunCancelled:
        return "cancelled"  # run_cancel already finished the step and revoked its leases
    except LeaseLost:
        return "timed-out" if ctx.timed_out.is_set() else "lease-lost"
    except EffectUnresolved as exc:
        return coordination.run(
            _finish_conflict,
            ctx,
            "lease_expired_with_pending_effect",
            str(exc),
            effect=exc.effect,
            current={"effect": exc.effect.idempotency_key, "status": exc.effect.status},
        )
    except gates.ApprovalNoLongerValid as exc:
        approval_id = exc.approval_id or (ctx.approval.approval_id if ctx.approval else None)
        return coordination.run(_finish_conflict, ctx, "stale_approval", str(exc), approval_id=approval_id)
    except gates.EntityChanged as exc:
        return coordination.run(
            _finish_conflict,
            ctx,
            "entity_version_mismatch",
            str(exc),
            target_key=exc.key,
            current={"version": exc.actual},
            proposed={"expected_version": exc.expected, "changes": exc.proposed},
        )
    except (EffectRequestMismatch, CallDiverged, Rejected) as exc:  # every attempt would end so
        return coordination.run(_finish_failed, ctx, spec, str(exc), retryable=False)
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return coordination.run(_finish_failed, ctx, spec, detail, retryable=True)
    if ctx.timed_out.is_set():
        return "timed-out"
    if ctx.parked:
        return "waiting_approval"  # the body caught StepParked and returned: it ended there all the same
    refusal = json_unstorable_reason(output)
    if refusal:
        if inspect.iscoroutine(output):
            output.close()  # a plain body that returned a coroutine: it never runs
        reason = f"the step's output cannot be stored as JSON: {refusal}"
        # Not retried: every attempt would return the same.
        return coordination.run(_finish_failed, ctx, spec, reason, retryable=False)
    return _Output(output)


def _run_async_body(ctx: StepContext, body: Callable[[AsyncStepContext], Awaitable[Any]]) -> Any:
    """Run an ``async def`` body to its end on an event loop of its own. Its reads and writes of
    Runwarden's tables go to one coordination thread (one database connection, closed after);
    its timeout, or its leases lost, cancel it (``_interrupt_body``)."""
    # Without the process's coordination threads (core.coordination), one of the step's own.
    own = None
    if coordination.current() is None:
        own = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"step-{ctx.step.pk}")

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        with _async_bodies_lock:
            _async_bodies[id(ctx)] = (loop, task)
        if ctx.timed_out.is_set() or ctx._lost.is_set():
            task.cancel()  # stopped before it was registered: the stop found nothing to cancel
        try:
            return await body(AsyncStepContext(ctx, own))
        except asyncio.CancelledError:
            if ctx.timed_out.is_set():
                raise StepTimedOut(f"step {ctx.step_key} of {ctx.run_id} timed out") from None
            await AsyncStepContext(ctx, own).heartbeat()  # RunCancelled, LeaseLost
            raise RuntimeError("the step body was cancelled") from None
        finally:
            with _async_bodies_lock:
                _async_bodies.pop(id(ctx), None)

    try:
        return asyncio.run(main())
    finally:
        if own is not None:
            own.submit(connections.close_all).result()
            own.shutdown()


def _fenced(ctx: StepContext, *, admitting: bool = False, deferred: bool = False) -> Any:
    """The fenced transaction that ends an attempt. Locks are taken in the one order every
    writer uses — admission lock (one shard of it, ``admitting``), step row, leases, run row —
    so a cancel, the reaper or a round never waits on this transaction while it waits on them.
    ``deferred``: the transaction's first write carries the fence (``core.leases.Fence``)."""

    # Sent in this order before the lease's row lock: in the fence's own round trip, or, when
    # the first write carries the fence (``deferred``), in that write's.
    step_lock, params = step_row_lock(ctx.step.pk)
    admission_lock = admission_shard_sql() if admitting and step_lock else ""
    return fenced_write(
        tenant_id=ctx.step.tenant_id,
        key=ctx.lease.key,
        token=ctx.lease.token,
        actor=f"step:{ctx.step.pk}",
        prelude_sql=(f"{admission_lock}{step_lock}", params),
        also=ctx.locks,
        deferred=deferred,
    )


def _wake_for_freed_room(ctx: StepContext, follow: Admission | None, leaving: Place) -> None:
    """A run's last step ended, freeing its place (``leaving``) under every cap, its worker
    slot and the run's session place: a round may now admit a step left waiting for one of
    them. Not when this worker's own next step took that very place (same tenant, workflow,
    lane and tool: no cap or slot has more room than before) and the run had no session. Its
    entity keys need no round of their own: ``admit_here`` handed each key's next waiter its
    key, or woke the dispatcher for it."""
    if follow is not None and follow.place == leaving and not ctx.run.session_key:
        return
    wake_on_commit(only_if_waiting=True, admission_locked=True)


def _finish_succeeded(
    ctx: StepContext, output: Any, lanes: frozenset[str]
) -> tuple[str, _Start | Admission | None]:
    """One fenced transaction: the output, the leases released, the next step readied — and,
    in a worker (``lanes``: the queues it consumes), the worker's own next step admitted to
    it directly: the run's next step when it may run here, else the fairest ready step of
    its lanes."""
    go_on = bool(lanes)
    leaving = (ctx.step.tenant_id, ctx.run.workflow, ctx.step.lane, ctx.step.tool)
    try:
        # The admission lock comes first, as in a dispatch round, so lock orders never cross.
        with _fenced(ctx, admitting=go_on, deferred=True) as fence:
            outcome, next_id = transitions.step_succeed(
                step=ctx.step,
                run=ctx.run,
                output=output,
                outputs=ctx.outputs,
                grants=ctx.grants(),
                wake_for_next=not go_on,
                fence=fence,
            )
            follow = (
                admit_here(
                    lanes=lanes,
                    prefer=next_id,
                    headroom=shard_headroom(),
                    released=[grant.key for grant in ctx.locks],
                    tenant_id=ctx.step.tenant_id,
                    idle_slots=idle_local_slots(lanes),
                    leaving=leaving,
                    leaving_until=ctx.lease.expires_at,
                    starts=_starts_at_once,
                )
                if go_on
                else None
            )
            if go_on and next_id and (follow is None or follow.step_id != next_id):
                wake_on_commit()  # the run's next step needs another worker
            if go_on and outcome == "succeeded" and next_id is None:
                _wake_for_freed_room(ctx, follow, leaving)
            if follow is None:
                return outcome, None
            # The step this worker admitted to itself starts in this same transaction: one
            # commit for the end of one step and the start of the next. Whatever goes wrong
            # with that start never undoes this step's success: the step is then started in a
            # transaction of its own.
            mine = {**ctx.outputs, ctx.step.key: output} if follow.step_id == next_id else None
            gated = follow.started is None and _gated(follow.workflow, follow.workflow_version, follow.key)
            if gated:  # its gate may raise: in a savepoint
                try:
                    with transaction.atomic():
                        return outcome, _begin(follow.step_id, follow.token, mine)
                except Exception:
                    logger.warning(
                        "starting step %s with the last one's end failed", follow.step_id, exc_info=True
                    )
                    return outcome, follow
            try:
                # No savepoint needed: the start writes nothing unless every lease is live, and
                # these leases were granted, and are row-locked, by this very transaction (a step
                # already started by its admission has no lease of its own length to renew:
                # ``_starts_at_once``; nothing here can raise StaleToken for it).
                return outcome, _begin(follow.step_id, follow.token, mine, follow.started)
            except StaleToken:
                return outcome, follow
    except StaleToken:
        if ctx.timed_out.is_set():
            return "timed-out", None
        # A zombie: the step belongs to a newer holder now. The refusal is recorded as an event
        # by fenced_write; here it also becomes a conflict artifact for a reviewer to see.
        with transaction.atomic():
            gates.report_conflict("stale_token_write", step=ctx.step, token=ctx.lease.token, proposed=output)
        return "stale", None


def _spec_of(workflow: str, version: str, key: str) -> StepSpec | None:
    """A step's declaration, or None where its workflow (version) or step is unknown."""
    try:
        return get_workflow(workflow, version).spec(key)
    except UnknownWorkflow:
        return None


def _gated(workflow: str, version: str, key: str) -> bool:
    """Whether a step waits on an approval gate (or is unknown)."""
    spec = _spec_of(workflow, version, key)
    return spec is None or spec.approval is not None


def _starts_at_once(candidate: Candidate) -> bool:
    """Whether a step this worker admits to itself as it finishes one is started by the very
    statement that admits it (its leases then run a running step's default length): every step
    but a gated one (whose gate may raise: it starts in a savepoint of its own) and one with a
    lease length of its own (renewed as it starts)."""
    spec = _spec_of(candidate.workflow, candidate.workflow_version, candidate.key)
    default = settings.RUNWARDEN_DEFAULT_LEASE_SECONDS
    return spec is not None and spec.approval is None and (spec.lease_seconds or default) == default


def _finish_failed(ctx: StepContext, spec: StepSpec, error: str, *, retryable: bool) -> str:
    try:
        with _fenced(ctx):
            transitions.step_inputs_remember(ctx.step, ctx.started_from)
            retrying = transitions.step_retry_or_fail(
                step=ctx.step,
                actor=f"step:{ctx.step.key}",
                error=error,
                retryable=retryable,
                backoff=spec.retry.delay(ctx.step.attempt),
                grants=ctx.grants(),
            )
    except StaleToken:
        return "stale"
    return "retrying" if retrying else "failed"


def _finish_conflict(ctx: StepContext, kind: str, error: str, **details: Any) -> str:
    try:
        with _fenced(ctx):
            transitions.step_inputs_remember(ctx.step, ctx.started_from)
            transitions.step_conflict(step=ctx.step, kind=kind, error=error, grants=ctx.grants(), **details)
    except StaleToken:
        return "stale"
    return "conflict"


def _time_out(ctx: StepContext) -> None:
    """The step ran past its timeout (called from its heartbeat thread): release everything it
    holds and retry or fail it by its policy — or, when an effect was in flight, let a
    reviewer decide whether it happened (the ledger's ambiguity rule)."""
    error = f"timed out after {ctx.deadline_seconds:g}s"
    step = ctx.step
    cancel_query = False
    try:
        with _fenced(ctx):
            ctx.timed_out.set()
            transitions.step_inputs_remember(step, ctx.started_from)
            pending = SideEffect.objects.filter(step=step, status=EffectStatus.PROPOSED).first()
            if pending is not None:
                transitions.step_conflict(
                    step=step,
                    kind="lease_expired_with_pending_effect",
                    error=f"{error} while an effect was in flight: did it happen?",
                    grants=ctx.grants(),
                    effect=pending,
                    current={
                        "effect": pending.idempotency_key,
                        "status": pending.status,
                        "request": pending.request,
                    },
                )
            else:
                cancel_query = True
                spec = get_workflow(ctx.run.workflow, ctx.run.workflow_version).spec(step.key)
                transitions.step_retry_or_fail(
                    step=step,
                    actor="timeout",
                    error=error,
                    retryable=True,
                    backoff=spec.retry.delay(step.attempt),
                    grants=ctx.grants(),
                )
    except StaleToken:
        return  # it finished, was cancelled or was reaped first
    _interrupt_body(ctx)
    with _armed_lock:
        body_running = _armed is ctx  # not yet returned: the connection is still its own
    if cancel_query and body_running and ctx.backend_pid is not None:
        # A body blocked in a query does not see the signal until the query returns: cancel
        # it. Not while an effect is in flight — that stays exactly as it was, for review.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_cancel_backend(%s)", [ctx.backend_pid])


# Stopping a body that hangs: when the step runs on the main thread (Celery's solo and prefork
# pools), the heartbeat thread sends SIGALRM to it and the handler raises StepTimedOut inside
# the body. Elsewhere (the embedded worker's thread) the body is fenced out instead: its next
# heartbeat, effect or checkpoint raises LeaseLost, and its late result is refused.
_armed: StepContext | None = None
_armed_lock = threading.RLock()  # the SIGALRM handler may run while the main thread holds it
_handler_installed = False


def _alarm(signum: int, frame: Any) -> None:
    with _armed_lock:
        ctx = _armed
    if ctx is not None and ctx.timed_out.is_set():
        raise StepTimedOut(f"step {ctx.step_key} of {ctx.run_id} timed out")


class _interruptible:
    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.on_main = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        global _armed, _handler_installed
        if not self.on_main:
            return
        if not _handler_installed:
            signal.signal(signal.SIGALRM, _alarm)
            _handler_installed = True
        with _armed_lock:
            _armed = self.ctx

    def __exit__(self, *exc: object) -> None:
        global _armed
        with _armed_lock:
            _armed = None


def _stop_on_lost(ctx: StepContext) -> None:
    """A heartbeat found the step's leases gone (its run cancelled, or taken over): an async
    body stops now, or once the effect it is in the middle of is recorded."""
    if not ctx.stop_after_effect():
        _interrupt_body(ctx)


# The async bodies running in this process, by their context: a timeout or a lost lease
# cancels the body's task (on its own loop's thread) instead of signalling.
_async_bodies: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = {}
_async_bodies_lock = threading.Lock()


def _interrupt_body(ctx: StepContext) -> None:
    with _async_bodies_lock:
        running = _async_bodies.get(id(ctx))
    if running is not None:
        loop, task = running
        with suppress(RuntimeError):  # its loop closed as the body returned
            loop.call_soon_threadsafe(task.cancel)
        return
    with _armed_lock:
        armed = _armed is ctx
    if armed:
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
