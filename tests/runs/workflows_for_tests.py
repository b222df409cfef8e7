"""Workflows only the tests use; worker processes load them via RUNWARDEN_WORKFLOW_MODULES.

Loading them also loads the bench's (bench.workloads): many tests start ``bench.noop``, the
cheapest run there is, and it is declared there only."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated, Any

import redis.asyncio
from django import db
from django.conf import settings
from pydantic import Field

import bench.workloads  # noqa: F401  (bench.noop, bench.five, bench.gated)
from demo import sandbox
from runs.context import AsyncStepContext, StepContext
from runs.definitions import ApprovalPolicy, SessionPolicy, WorkflowInput, workflow

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class NoInput(WorkflowInput):
    pass


class SlowSendInput(WorkflowInput):
    work_seconds: Seconds = 3


slow_send = workflow(
    "test.slow_send", description="works for a while, then sends one message", input=SlowSendInput
)


@slow_send.step(lane="external", tool="messaging")
def work_then_send(ctx: StepContext) -> dict[str, Any]:
    ctx.checkpoint({"pid": os.getpid(), "attempt": ctx.attempt})
    deadline = time.monotonic() + float(ctx.input.get("work_seconds", 3))
    while time.monotonic() < deadline:
        time.sleep(0.1)
        ctx.heartbeat()
    sent = ctx.effect(
        "messaging.send",
        lambda: sandbox.messaging_send(
            tenant_id=ctx.tenant_id, to="x@example.com", subject="s", body=ctx.run_id
        ),
        request={"run": ctx.run_id},
    )
    return {"pid": os.getpid(), "message_id": sent["message_id"]}


class SleepyInput(WorkflowInput):
    sleep_seconds: Seconds = 3


sleepy = workflow("test.sleepy", description="sleeps without calling the context", input=SleepyInput)


@sleepy.step(lane="external")
def sleep_then_answer(ctx: StepContext) -> dict[str, Any]:
    ctx.checkpoint({"pid": os.getpid(), "attempt": ctx.attempt})
    time.sleep(float(ctx.input.get("sleep_seconds", 3)))
    return {"pid": os.getpid()}


class BusyInput(WorkflowInput):
    hold_seconds: Seconds = 0.3


busy = workflow("test.busy_crm", description="holds a CRM-tool slot for a while", input=BusyInput)


@busy.step(lane="read", tool="crm")
def hold_crm(ctx: StepContext) -> dict[str, Any]:
    time.sleep(float(ctx.input.get("hold_seconds", 0.3)))
    return {"held": True}


quorum = workflow(
    "test.quorum", description="a draft that two distinct operators must approve", input=NoInput
)


@quorum.step(lane="draft")
def draft(ctx: StepContext) -> dict[str, Any]:
    return {"subject": "Quarterly report", "body": f"Draft for {ctx.run_id}"}


@quorum.step(lane="external", approval=ApprovalPolicy(required=2, roles=("operator",)))
def publish(ctx: StepContext) -> dict[str, Any]:
    return {"published": ctx.approved_content["subject"]}


timed = workflow("test.timed_gate", description="an approval that times out", input=NoInput)


@timed.step(lane="draft")
def timed_draft(ctx: StepContext) -> dict[str, Any]:
    return {"body": "time-boxed"}


@timed.step(lane="external", approval=ApprovalPolicy(timeout_seconds=60, on_timeout="reject"))
def timed_send(ctx: StepContext) -> dict[str, Any]:
    return {"sent": ctx.approved_content["body"]}


class CrashOnSendInput(WorkflowInput):
    die_after_send: bool = False
    die_after_commit: bool = False


crash_on_send = workflow(
    "test.crash_on_send", description="the worker dies in the middle of sending", input=CrashOnSendInput
)


@crash_on_send.step(lane="external", tool="messaging")
def send_and_die(ctx: StepContext) -> dict[str, Any]:
    die_after_send = bool(ctx.input.get("die_after_send"))

    def send() -> dict[str, Any]:
        if ctx.attempt == 1 and not die_after_send and not ctx.input.get("die_after_commit"):
            os._exit(9)  # dies after proposing, before the provider got the call
        sent = sandbox.messaging_send(
            tenant_id=ctx.tenant_id, to="x@example.com", subject="s", body=ctx.run_id
        )
        if ctx.attempt == 1 and die_after_send:
            os._exit(9)  # the provider sent it; the worker dies before recording that
        return sent

    sent = ctx.effect("messaging.send", send, request={"run": ctx.run_id})
    if ctx.attempt == 1 and ctx.input.get("die_after_commit"):
        os._exit(9)  # the effect is recorded as committed; the worker dies before the step ends
    return {"message_id": sent.get("message_id") or sent["external_ref"]}


quick_gate = workflow(
    "test.quick_timeout_gate", description="an approval that times out in 2 s", input=NoInput
)


@quick_gate.step(lane="draft")
def quick_draft(ctx: StepContext) -> dict[str, Any]:
    return {"body": "decide quickly"}


@quick_gate.step(lane="external", approval=ApprovalPolicy(timeout_seconds=2, on_timeout="reject"))
def quick_send(ctx: StepContext) -> dict[str, Any]:
    return {"sent": True}


escalating = workflow(
    "test.escalating_gate", description="an approval that escalates to admins on timeout", input=NoInput
)


@escalating.step(lane="draft")
def escalating_draft(ctx: StepContext) -> dict[str, Any]:
    return {"body": "needs a decision"}


@escalating.step(lane="external", approval=ApprovalPolicy(timeout_seconds=60, on_timeout="escalate"))
def escalating_send(ctx: StepContext) -> dict[str, Any]:
    return {"sent": ctx.approved_content["body"]}


auto = workflow(
    "test.auto_gate", description="a low-risk approval that auto-approves on timeout", input=NoInput
)


@auto.step(lane="read")
def auto_draft(ctx: StepContext) -> dict[str, Any]:
    return {"summary": "low risk"}


@auto.step(lane="draft", approval=ApprovalPolicy(timeout_seconds=60, on_timeout="auto_approve"))
def auto_publish(ctx: StepContext) -> dict[str, Any]:
    return {"published": ctx.approved_content["summary"]}


# Engine v2's process tests (tests/runs/test_engine_processes.py): steps that hang past their
# timeout without ever calling the context.


class HangOnEntityInput(WorkflowInput):
    contact_id: int = Field(ge=1)
    sleep_seconds: Seconds = 30


hang_on_entity = workflow(
    "test.hang_on_entity",
    description="holds a contact's lock and hangs past its timeout",
    input=HangOnEntityInput,
)


@hang_on_entity.step(lane="external", locks=["crm_contact:{contact_id}"], timeout_seconds=1.5, max_attempts=1)
def hang_holding_lock(ctx: StepContext) -> dict[str, Any]:
    ctx.checkpoint({"pid": os.getpid(), "attempt": ctx.attempt})
    time.sleep(float(ctx.input.get("sleep_seconds", 30)))  # never calls ctx again
    return {"pid": os.getpid()}


class HangInEffectInput(WorkflowInput):
    sleep_seconds: Seconds = 30


hang_in_effect = workflow(
    "test.hang_in_effect",
    description="sends a message, then hangs inside the effect past its timeout",
    input=HangInEffectInput,
)


@hang_in_effect.step(lane="external", tool="messaging", timeout_seconds=1.5, max_attempts=1)
def send_then_hang(ctx: StepContext) -> dict[str, Any]:
    ctx.checkpoint({"pid": os.getpid(), "attempt": ctx.attempt})

    def send() -> dict[str, Any]:
        sent = sandbox.messaging_send(
            tenant_id=ctx.tenant_id, to="x@example.com", subject="s", body=ctx.run_id
        )
        time.sleep(float(ctx.input.get("sleep_seconds", 30)))  # the provider never answers
        return sent

    sent = ctx.effect("messaging.send", send, request={"run": ctx.run_id})
    return {"message_id": sent["message_id"]}


# A body blocked in a database call (a slow query, a row lock): libpq waits in C and retries
# its poll on EINTR, so a signal handler runs only when the call returns.
hang_in_query = workflow(
    "test.hang_in_query",
    description="holds a contact's lock and hangs in a database call past its timeout",
    input=HangOnEntityInput,
)


@hang_in_query.step(lane="external", locks=["crm_contact:{contact_id}"], timeout_seconds=1.5, max_attempts=1)
def hang_in_a_query(ctx: StepContext) -> dict[str, Any]:
    from django.db import connection

    ctx.checkpoint({"pid": os.getpid(), "attempt": ctx.attempt})
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [float(ctx.input.get("sleep_seconds", 30))])
    return {"pid": os.getpid()}


# Sessions: runs of one conversation take turns (tests/runs/test_sessions.py).


class TurnInput(WorkflowInput):
    message: str = ""
    work_seconds: Seconds = 0.05


def _turn_step(ctx: StepContext) -> dict[str, Any]:
    time.sleep(float(ctx.input.get("work_seconds", 0.05)))
    return {"message": ctx.input.get("message", ""), "pid": os.getpid()}


chat_turn = workflow(
    "test.chat_turn", description="two steps per message, one message at a time", input=TurnInput
)
chat_turn.step(key="read_turn", lane="read")(_turn_step)
chat_turn.step(key="answer_turn", lane="draft")(_turn_step)

chat_pair = workflow(
    "test.chat_pair",
    description="two messages of a session at a time",
    input=TurnInput,
    session=SessionPolicy(max_concurrent=2),
)
chat_pair.step(key="pair_turn", lane="read")(_turn_step)

chat_gated = workflow("test.chat_gated", description="a turn that waits for an approval", input=TurnInput)
chat_gated.step(key="gated_draft", lane="draft")(_turn_step)


@chat_gated.step(lane="external", approval=ApprovalPolicy(required=1, roles=("operator",)))
def gated_send(ctx: StepContext) -> dict[str, Any]:
    return {"sent": ctx.approved_content}


chat_strict = workflow(
    "test.chat_strict",
    description="a busy session refuses new messages",
    input=TurnInput,
    session=SessionPolicy(overflow="reject"),
)
chat_strict.step(key="strict_turn", lane="read")(_turn_step)

chat_latest = workflow(
    "test.chat_latest",
    description="only the newest waiting message matters",
    input=TurnInput,
    session=SessionPolicy(overflow="cancel_oldest_waiting"),
)
chat_latest.step(key="latest_turn", lane="read")(_turn_step)

chat_impatient = workflow(
    "test.chat_impatient",
    description="a waiting message expires after a second",
    input=TurnInput,
    session=SessionPolicy(queue_timeout_seconds=1, sequence_gap_seconds=1),
)
chat_impatient.step(key="impatient_turn", lane="read")(_turn_step)


# Compensation (tests/runs/test_compensation.py).


class OrderInput(WorkflowInput):
    invoice_id: int = 1
    crash_in_refund: bool = False
    refund_always_fails: bool = False


def _refund(ctx: StepContext, results: dict[str, Any]) -> dict[str, Any]:
    if ctx.input.get("refund_always_fails"):
        raise RuntimeError("the payment provider refuses refunds today")
    charge = results["payments.charge"]
    refunded = ctx.effect(
        "payments.refund",
        lambda: sandbox.payments_refund(
            tenant_id=ctx.tenant_id, payment_id=charge["payment_id"], amount=charge["amount"]
        ),
        request={"payment_id": charge["payment_id"]},
    )
    if ctx.input.get("crash_in_refund") and ctx.attempt == 1:
        os._exit(9)  # the worker dies after the refund committed, before the step finished
    return refunded


def _release(ctx: StepContext, results: dict[str, Any]) -> dict[str, Any]:
    reservation = results["inventory.reserve"]
    return ctx.effect(
        "inventory.release",
        lambda: sandbox.inventory_release(
            tenant_id=ctx.tenant_id, reservation_id=reservation["reservation_id"]
        ),
        request={"reservation_id": reservation["reservation_id"]},
    )


gated_order = workflow(
    "test.gated_order",
    description="reserve, charge, then wait for an approval to confirm",
    input=OrderInput,
)


@gated_order.step(lane="external", tool="inventory", compensate=_release)
def hold_stock(ctx: StepContext) -> dict[str, Any]:
    return ctx.effect(
        "inventory.reserve",
        lambda: sandbox.inventory_reserve(tenant_id=ctx.tenant_id, sku="SKU-T", quantity=1),
        request={"sku": "SKU-T"},
    )


@gated_order.step(lane="external", tool="payments", compensate=_refund, backoff_seconds=0.01, max_attempts=1)
def take_payment(ctx: StepContext) -> dict[str, Any]:
    from decimal import Decimal

    return ctx.effect(
        "payments.charge",
        lambda: sandbox.payments_charge(
            tenant_id=ctx.tenant_id, invoice_id=int(ctx.input.get("invoice_id", 1)), amount=Decimal("10.00")
        ),
        request={"invoice_id": ctx.input.get("invoice_id", 1)},
    )


@gated_order.step(lane="external", approval=ApprovalPolicy(required=1, roles=("operator",)))
def confirm_after_approval(ctx: StepContext) -> dict[str, Any]:
    return {"confirmed": True}


failing_order = workflow(
    "test.failing_order",
    description="reserve, charge, then a confirmation that always fails",
    input=OrderInput,
)
failing_order.step(key="hold_stock", lane="external", tool="inventory", compensate=_release)(hold_stock)
failing_order.step(
    key="take_payment",
    lane="external",
    tool="payments",
    compensate=_refund,
    max_attempts=1,
    backoff_seconds=0.01,
)(take_payment)


@failing_order.step(lane="read", max_attempts=1)
def confirm_fails(ctx: StepContext) -> dict[str, Any]:
    raise RuntimeError("the order service refused the confirmation")


class ThingInput(WorkflowInput):
    thing_id: int = 1


gives_way = workflow(
    "test.gives_way", description="skips its run when its thing is locked by another", input=ThingInput
)


@gives_way.step(lane="read", locks=["thing:{thing_id}"], lock_policy="skip")
def touch_thing(ctx: StepContext) -> dict[str, Any]:
    return {"touched": ctx.input["thing_id"]}


class AwaitInput(WorkflowInput):
    wait_seconds: Seconds = 1.0


awaits_a_model = workflow(
    "test.awaits_a_model", description="awaits a stand-in model call, then notifies once", input=AwaitInput
)


async def notify(run_id: str) -> dict[str, Any]:
    """The outside world: a notification service, here a Redis counter per run."""
    client = redis.asyncio.from_url(settings.REDIS_URL)
    try:
        return {"count": await client.incr(f"test:notified:{run_id}")}
    finally:
        await client.aclose()


@awaits_a_model.step(lane="draft", lease_seconds=3)
async def await_then_notify(ctx: AsyncStepContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.input["wait_seconds"]))  # a model call
    await ctx.checkpoint({"answered": True})
    return await ctx.effect("notify.send", lambda: notify(ctx.run_id), request={"run": ctx.run_id})


def notify_plainly(run_id: str) -> dict[str, Any]:
    """``notify`` for a plain body."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return {"count": client.incr(f"test:notified:{run_id}")}
    finally:
        client.close()


waits_plainly = workflow(
    "test.waits_plainly", description="waits in a plain body, then notifies once", input=AwaitInput
)


@waits_plainly.step(lane="draft", lease_seconds=3)
def wait_then_notify(ctx: StepContext) -> dict[str, Any]:
    # Whether this thread holds a connection already: the step's start opened it where the
    # slot does its own database work (a prefork worker's process, a small threads pool).
    connected = db.connection.connection is not None
    time.sleep(float(ctx.input["wait_seconds"]))  # a model call, made by a plain client
    ctx.checkpoint({"answered": True})
    sent = ctx.effect("notify.send", lambda: notify_plainly(ctx.run_id), request={"run": ctx.run_id})
    return {**sent, "started_on_this_thread": connected}


awaits_a_tool = workflow(
    "test.awaits_a_tool", description="the same, through the capped crm tool", input=AwaitInput
)
awaits_a_tool.step(lane="draft", lease_seconds=3, tool="crm")(await_then_notify)


# The outside world of the governed-call tests: a CRM that counts the calls it serves at once
# (the highest count kept, atomically) and each call it served, in Redis.
CRM_MOST_IN_FLIGHT = (
    "local now = redis.call('incr', KEYS[1]) "
    "if now > tonumber(redis.call('get', KEYS[2]) or '0') then redis.call('set', KEYS[2], now) end "
    "return now"
)


async def crm_call(run_id: str, call: str, seconds: float = 0.05) -> dict[str, Any]:
    client = redis.asyncio.from_url(settings.REDIS_URL)
    try:
        await client.eval(CRM_MOST_IN_FLIGHT, 2, "test:crm:in_flight", "test:crm:most")
        try:
            await asyncio.sleep(seconds)
            served = await client.incr(f"test:crm:served:{run_id}:{call}")
        finally:
            await client.decr("test:crm:in_flight")
        return {"call": call, "served": served}
    finally:
        await client.aclose()


class AgentInput(WorkflowInput):
    calls: int = Field(default=3, ge=1, le=20)


crm_agent = workflow(
    "test.crm_agent", description="an agent step making several governed crm calls", input=AgentInput
)


@crm_agent.step(lane="draft", lease_seconds=3)
async def agent_calls_the_crm(ctx: AsyncStepContext) -> dict[str, Any]:
    answers = []
    for n in range(int(ctx.input["calls"])):
        answer = await ctx.tool(
            "crm",
            lambda request: crm_call(ctx.run_id, request["n"]),
            request={"n": str(n)},
            locks=[f"contact:{n % 3}"] if n == 0 else [],
        )
        answers.append(answer["served"])
    return {"served": answers}


crm_step = workflow("test.crm_step", description="one step declared with the crm tool, its body a crm call")


@crm_step.step(lane="draft", lease_seconds=3, tool="crm")
async def step_calls_the_crm(ctx: AsyncStepContext) -> dict[str, Any]:
    return await ctx.effect("crm.write", lambda: crm_call(ctx.run_id, "step"), request={"run": ctx.run_id})


async def slow_payment(run_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """The outside world: a payments API that takes its time (a worker can die meanwhile)."""
    client = redis.asyncio.from_url(settings.REDIS_URL)
    try:
        await client.incr(f"test:pay:started:{run_id}")
        await asyncio.sleep(float(request.get("seconds", 0.05)))
        return {"paid": request["amount"], "n": await client.incr(f"test:pay:done:{run_id}")}
    finally:
        await client.aclose()


approved_payment = workflow(
    "test.approved_payment", description="an agent step whose payment call a human approves mid-step"
)


@approved_payment.step(lane="draft", lease_seconds=2)
async def pay_when_approved(ctx: AsyncStepContext) -> dict[str, Any]:
    looked_up = await ctx.tool(
        "crm", lambda request: {"customer": request["customer"]}, request={"customer": "c1"}
    )
    paid = await ctx.tool(
        "payments",
        lambda request: slow_payment(ctx.run_id, request),
        request={"amount": 250, "seconds": float(ctx.input.get("seconds", 0.05))},
        approval=True,
    )
    return {"customer": looked_up["customer"], "paid": paid["paid"]}


waits = workflow("test.waits", description="awaits a stand-in model call, and nothing else", input=AwaitInput)


@waits.step(lane="draft")
async def just_wait(ctx: AsyncStepContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.input["wait_seconds"]))  # a model call
    return {"waited": ctx.input["wait_seconds"]}
