"""Workflows only the tests use; worker processes load them via RUNWARDEN_WORKFLOW_MODULES."""

from __future__ import annotations

import os
import time
from typing import Any

from runs import sandbox
from runs.context import StepContext
from runs.definitions import workflow

slow_send = workflow("test.slow_send", description="works for a while, then sends one message")


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


sleepy = workflow("test.sleepy", description="sleeps without calling the context")


@sleepy.step(lane="external")
def sleep_then_answer(ctx: StepContext) -> dict[str, Any]:
    ctx.checkpoint({"pid": os.getpid(), "attempt": ctx.attempt})
    time.sleep(float(ctx.input.get("sleep_seconds", 3)))
    return {"pid": os.getpid()}


busy = workflow("test.busy_crm", description="holds a CRM-tool slot for a while")


@busy.step(lane="read", tool="crm")
def hold_crm(ctx: StepContext) -> dict[str, Any]:
    time.sleep(float(ctx.input.get("hold_seconds", 0.3)))
    return {"held": True}
