"""``async def`` step bodies: they await models and tools, go through the ledger, the fence
and the leases as plain bodies do, and stop by task cancellation on a timeout or a cancel.
A body whose output cannot be stored fails at once with the reason; a body the engine cannot
run is refused when it is declared."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest
from django.db import connections

from core import coordination
from core.models import Lease, Tenant
from runs.context import AsyncStepContext, StepContext
from runs.definitions import WorkflowDefinitionError, WorkflowInput, workflow
from runs.dispatch import Admission, dispatch_round
from runs.executor import step_execute
from runs.invariants import check_invariants
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus
from runs.services import run_cancel, run_start
from tests.approvals.helpers import pump, pump_until
from tests.runs.cluster import wait_for

pytestmark = pytest.mark.both_dialects


@pytest.fixture(autouse=True, params=["in place", "on coordination threads", "on each slot of a small pool"])
def database_work(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test three times: as a prefork or solo worker runs steps (its database work in
    place, an async body's on a thread of the step's own), as a threads-pool worker does
    (handed to the process's few coordination threads), and as a pool of no more slots than
    coordination threads does (in place on each slot's thread, an async body's on the
    coordination threads)."""
    MAILER.sent.clear()  # the outside world starts afresh
    if request.param == "on coordination threads":
        coordination.coordinate_on_threads(2)
    elif request.param == "on each slot of a small pool":
        coordination.coordinate_on_threads(3, slots=2)  # one thread left for async bodies
    try:
        yield request.param
    finally:
        coordination.coordinate_in_place()


class Question(WorkflowInput):
    question: str = "hello"
    fail_after_send: bool = False


class FakeModel:
    """The outside world: a model API that answers after a while."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def complete(self, prompt: str, seconds: float = 0.05) -> str:
        await asyncio.sleep(seconds)
        self.prompts.append(prompt)
        return f"reply to {prompt}"


class FakeMailer:
    """The outside world: a mail provider that records what it sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, body: str) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        self.sent.append(body)
        return {"message_id": f"m{len(self.sent)}"}


MODEL = FakeModel()
MAILER = FakeMailer()
ATTEMPTS_FAILED_AFTER_SEND: set[str] = set()

answering = workflow("test.async_answer", description="drafts with a model, then sends", input=Question)


@answering.step(lane="draft")
async def draft_reply(ctx: AsyncStepContext) -> dict[str, Any]:
    reply = await MODEL.complete(ctx.input["question"])
    await ctx.checkpoint({"drafted": True})
    await ctx.heartbeat()
    return {"reply": reply}


@answering.step(lane="external", tool="messaging")
async def send_reply(ctx: AsyncStepContext) -> dict[str, Any]:
    body = ctx.outputs["draft_reply"]["reply"]
    sent = await ctx.effect("mail.send", lambda: MAILER.send(body), request={"body": body})
    if ctx.input["fail_after_send"] and ctx.run_id not in ATTEMPTS_FAILED_AFTER_SEND:
        ATTEMPTS_FAILED_AFTER_SEND.add(ctx.run_id)
        raise ConnectionError("the tool's answer was lost after it sent")
    return {"message_id": sent["message_id"]}


@answering.step(lane="read")
def summarise(ctx: StepContext) -> dict[str, Any]:  # a plain step after async ones, same run
    return {"summary": f"sent {ctx.outputs['send_reply']['message_id']}"}


def executing(admission: Admission, outcome: list[str]) -> threading.Thread:
    """The admitted step executing on a thread of its own, as a worker's slot runs it; its
    outcome appended to ``outcome``."""

    def execute() -> None:
        try:
            outcome.append(step_execute(step_id=admission.step_id, token=admission.token))
        finally:
            connections.close_all()  # this thread's own, if it opened one

    thread = threading.Thread(target=execute)
    thread.start()
    return thread


def run_to_its_end(run: Run) -> Run:
    pump_until(lambda: Run.objects.get(pk=run.pk).status in (RunStatus.SUCCEEDED, RunStatus.FAILED))
    return Run.objects.get(pk=run.pk)


@pytest.mark.django_db(transaction=True)
def test_an_async_step_awaits_a_model_and_a_plain_step_of_another_lane_follows(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow=answering.key, input={"question": "q-one"}, actor="t").run
    done = run_to_its_end(run)
    assert done.status == RunStatus.SUCCEEDED, done.steps.values_list("key", "status", "error")
    outputs = dict(done.steps.values_list("key", "output"))
    assert outputs["draft_reply"] == {"reply": "reply to q-one"}
    assert outputs["summarise"] == {"summary": f"sent {outputs['send_reply']['message_id']}"}
    assert Step.objects.get(run=done, key="draft_reply").checkpoint == {"drafted": True}
    assert MAILER.sent.count("reply to q-one") == 1
    effect = SideEffect.objects.get(run=done)
    assert effect.status == EffectStatus.COMMITTED
    assert effect.result == outputs["send_reply"]
    assert check_invariants() == []


@pytest.mark.django_db(transaction=True)
def test_an_async_effect_is_not_repeated_when_its_step_is_retried(acme: Tenant) -> None:
    question = "q-retried"
    run = run_start(
        tenant=acme, workflow=answering.key, input={"question": question, "fail_after_send": True}, actor="t"
    ).run
    done = run_to_its_end(run)
    assert done.status == RunStatus.SUCCEEDED
    send = Step.objects.get(run=done, key="send_reply")
    assert send.attempt == 2, "the first attempt failed after its effect and was retried"
    assert MAILER.sent.count(f"reply to {question}") == 1, "the retry got the recorded result"
    assert SideEffect.objects.get(run=done).status == EffectStatus.COMMITTED


# Cancellation: a body awaiting a model longer than it may stops at once, by task cancellation.
BODY_EVENTS: dict[str, list[str]] = {}


class Slow(WorkflowInput):
    seconds: float = 5.0


slow_thinking = workflow("test.async_slow_thinking", description="awaits a slow model", input=Slow)


@slow_thinking.step(lane="draft", timeout_seconds=0.6, lease_seconds=0.6, max_attempts=1)
async def think(ctx: AsyncStepContext) -> dict[str, Any]:
    events = BODY_EVENTS.setdefault(ctx.run_id, [])
    events.append("started")
    try:
        await MODEL.complete("slow", seconds=ctx.input["seconds"])
    except asyncio.CancelledError:
        events.append("cancelled")
        raise
    events.append("answered")
    return {"late": True}


@pytest.mark.django_db(transaction=True)
def test_an_async_step_past_its_timeout_is_cancelled_not_left_running(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow=slow_thinking.key, input={"seconds": 5.0}, actor="t").run
    began = time.monotonic()
    outcomes = pump()
    took = time.monotonic() - began
    assert outcomes == ["timed-out"]
    assert BODY_EVENTS[run.pk] == ["started", "cancelled"]
    assert took < 4.0, f"the body's 5 s await was cancelled, not waited out ({took:.1f} s)"
    step = Step.objects.get(run=run)
    assert step.status == StepStatus.FAILED and "timed out after 0.6s" in step.error
    assert check_invariants() == []


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_runs_async_step_stops_within_a_heartbeat(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow=slow_thinking.key, input={"seconds": 5.0}, actor="t").run
    (admission,) = dispatch_round()
    outcome: list[str] = []
    worker = executing(admission, outcome)
    wait_for(lambda: BODY_EVENTS.get(run.pk) == ["started"], 10, "the body never started", interval=0.01)
    cancelled_at = time.monotonic()
    assert run_cancel(run=run, actor="t")
    worker.join(5)
    stopped_after = time.monotonic() - cancelled_at
    assert outcome == ["cancelled"]
    assert BODY_EVENTS[run.pk] == ["started", "cancelled"]
    # The heartbeat interval is a third of the 0.6 s lease: it notices within one beat or two.
    assert stopped_after < 2.0, f"stopped {stopped_after:.2f} s after the cancel"
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED
    assert check_invariants() == []


# An effect in flight when the body is cancelled may have happened: it stays for a reviewer.
hanging_send = workflow("test.async_hanging_send", description="its send never answers", input=Slow)


@hanging_send.step(lane="external", timeout_seconds=0.6, lease_seconds=0.6, max_attempts=1)
async def send_and_hang(ctx: AsyncStepContext) -> dict[str, Any]:
    return await ctx.effect("mail.send", lambda: MODEL.complete("never", seconds=ctx.input["seconds"]))


@pytest.mark.django_db(transaction=True)
def test_an_async_effect_cut_off_by_the_timeout_stays_proposed_for_review(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow=hanging_send.key, input={"seconds": 5.0}, actor="t").run
    assert pump() == ["timed-out"]  # the timeout recorded what it found: an effect in flight
    assert SideEffect.objects.get(run=run).status == EffectStatus.PROPOSED
    step = Step.objects.get(run=run)
    assert step.status == StepStatus.CONFLICT and "did it happen?" in step.error


# What cannot be stored fails its step at once, with the reason, instead of hanging it.
unstorable = workflow("test.unstorable_output", description="returns what JSON cannot hold", input=Question)


@unstorable.step(lane="read")
def returns_a_date(ctx: StepContext) -> Any:
    return {"when": date(2026, 12, 2)}


returns_a_coroutine = workflow(
    "test.returns_a_coroutine", description="a plain body handing back a coroutine", input=Question
)


@returns_a_coroutine.step(lane="read")
def forgot_to_await(ctx: StepContext) -> Any:
    return MODEL.complete("never awaited")


returns_a_set = workflow(
    "test.async_returns_a_set", description="an async body returning a set", input=Question
)


@returns_a_set.step(lane="read")
async def gives_a_set(ctx: AsyncStepContext) -> Any:
    return {"tags": {"a", "b"}}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("definition", "reason"),
    [
        (unstorable, "Object of type date is not JSON serializable"),
        (returns_a_coroutine, "Object of type coroutine is not JSON serializable"),
        (returns_a_set, "Object of type set is not JSON serializable"),
    ],
)
def test_an_output_that_cannot_be_stored_fails_the_step_at_once_with_the_reason(
    acme: Tenant, definition: Any, reason: str
) -> None:
    run = run_start(tenant=acme, workflow=definition.key, input={}, actor="t").run
    assert pump() == ["failed"]
    step = Step.objects.get(run=run)
    assert step.status == StepStatus.FAILED
    assert step.attempt == 1, "not retried: every attempt would return the same"
    assert step.error == f"the step's output cannot be stored as JSON: {reason}"
    assert Run.objects.get(pk=run.pk).status == RunStatus.FAILED
    # The engine still does its job.
    normal = run_start(tenant=acme, workflow=answering.key, input={"question": "after"}, actor="t").run
    assert run_to_its_end(normal).status == RunStatus.SUCCEEDED


def test_a_body_that_yields_is_refused_when_it_is_declared(database_work: str) -> None:
    refused = workflow(f"test.refused_generators.{database_work}", description="never registered whole")

    def yields(ctx: StepContext) -> Any:
        yield {"partial": True}

    async def yields_async(ctx: AsyncStepContext) -> Any:
        yield {"partial": True}

    for body in (yields, yields_async):
        with pytest.raises(WorkflowDefinitionError, match="must return its result"):
            refused.step(lane="read")(body)
    assert refused.steps == []


# A run cancelled while an effect's call is in flight: the call finishes and is recorded (as a
# plain body's would), then the body stops; nothing is left for a reviewer to guess about.
slow_tool = workflow("test.async_slow_tool", description="its tool call takes a second", input=Slow)


@slow_tool.step(lane="external", lease_seconds=0.6, max_attempts=1)
async def call_the_slow_tool(ctx: AsyncStepContext) -> dict[str, Any]:
    events = BODY_EVENTS.setdefault(ctx.run_id, [])

    async def slow_send() -> dict[str, Any]:
        events.append("calling")
        sent = await MAILER.send(f"slow {ctx.run_id}")
        await asyncio.sleep(ctx.input["seconds"])
        events.append("called")
        return sent

    sent = await ctx.effect("mail.send", slow_send)
    events.append("after the effect")  # never reached: the cancel stops it once it is recorded
    return sent


@pytest.mark.django_db(transaction=True)
def test_a_cancel_during_an_async_effect_lets_the_call_finish_and_be_recorded(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow=slow_tool.key, input={"seconds": 1.0}, actor="t").run
    (admission,) = dispatch_round()
    outcome: list[str] = []
    worker = executing(admission, outcome)
    wait_for(lambda: BODY_EVENTS.get(run.pk) == ["calling"], 10, "the call never started", interval=0.01)
    assert run_cancel(run=run, actor="t")
    worker.join(10)
    assert outcome == ["cancelled"]
    assert BODY_EVENTS[run.pk] == ["calling", "called"]
    effect = SideEffect.objects.get(run=run)
    assert effect.status == EffectStatus.COMMITTED, "the call happened: the ledger says so"
    assert MAILER.sent.count(f"slow {run.pk}") == 1
    assert check_invariants() == []


# A lock wait holds no coordination thread: with one, a step waiting for a key must not keep
# the key's holder from finishing (and releasing it), nor another step from running.
holding = workflow("test.async_holds_a_key", description="holds a key for a while", input=Slow)
waiting = workflow("test.async_waits_for_a_key", description="waits for that key", input=Slow)
quick = workflow("test.async_quick", description="needs nothing", input=Slow)
FINISHED_AT: dict[str, float] = {}


@holding.step(lane="read")
async def hold_the_key(ctx: AsyncStepContext) -> dict[str, Any]:
    await ctx.lock("contact:1")
    await asyncio.sleep(ctx.input["seconds"])
    FINISHED_AT["holder"] = time.monotonic()
    return {}


@waiting.step(lane="read")
async def wait_for_the_key(ctx: AsyncStepContext) -> dict[str, Any]:
    await ctx.lock("contact:1", wait_timeout=10)
    FINISHED_AT["waiter"] = time.monotonic()
    return {}


@quick.step(lane="read")
async def need_nothing(ctx: AsyncStepContext) -> dict[str, Any]:
    FINISHED_AT["quick"] = time.monotonic()
    return {}


@pytest.mark.django_db(transaction=True)
def test_a_step_waiting_for_a_lock_holds_back_neither_the_holder_nor_others(
    acme: Tenant, database_work: str
) -> None:
    if database_work == "on coordination threads":
        coordination.coordinate_in_place()
        coordination.coordinate_on_threads(1)  # the tightest: one thread for every step
    FINISHED_AT.clear()

    def execute_next(workflow_key: str) -> threading.Thread:
        run_start(tenant=acme, workflow=workflow_key, input={"seconds": 0.8}, actor="t")
        (admission,) = dispatch_round()
        thread = threading.Thread(
            target=step_execute, kwargs={"step_id": admission.step_id, "token": admission.token}
        )
        thread.start()
        return thread

    holder = execute_next(holding.key)
    wait_for(
        lambda: Lease.objects.filter(key="contact:1", released_at__isnull=True).exists(), 10, "never held"
    )
    threads = [holder, execute_next(waiting.key), execute_next(quick.key)]
    for thread in threads:
        thread.join(15)
    assert set(FINISHED_AT) == {"holder", "waiter", "quick"}, "the waiter got the key once it was free"
    assert FINISHED_AT["quick"] < FINISHED_AT["holder"] < FINISHED_AT["waiter"]
    assert check_invariants() == []
