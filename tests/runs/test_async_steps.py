"""``async def`` step bodies: they await models and tools, go through the ledger, the fence
and the leases as plain bodies do, and stop by task cancellation on a timeout or a cancel.
A body whose output cannot be stored fails at once with the reason; a body the engine cannot
run is refused when it is declared."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import date
from typing import Any

import pytest

from core.models import Tenant
from runs.context import AsyncStepContext, StepContext
from runs.definitions import WorkflowDefinitionError, WorkflowInput, workflow
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.invariants import check_invariants
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus
from runs.services import run_cancel, run_start
from tests.approvals.helpers import pump, pump_until

pytestmark = pytest.mark.both_dialects


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
    worker = threading.Thread(
        target=lambda: outcome.append(step_execute(step_id=admission.step_id, token=admission.token))
    )
    worker.start()
    while BODY_EVENTS.get(run.pk) != ["started"]:
        time.sleep(0.01)
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


def test_a_body_that_yields_is_refused_when_it_is_declared() -> None:
    refused = workflow("test.refused_generators", description="never registered whole")

    def yields(ctx: StepContext) -> Any:
        yield {"partial": True}

    async def yields_async(ctx: AsyncStepContext) -> Any:
        yield {"partial": True}

    for body in (yields, yields_async):
        with pytest.raises(WorkflowDefinitionError, match="must return its result"):
            refused.step(lane="read")(body)
    assert refused.steps == []
