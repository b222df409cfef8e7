"""Workflows of ``manage.py bench`` (not the demo's): no-op steps that measure the engine's own cost.

Imported at start-up only where ``RUNWARDEN_WORKFLOW_MODULES`` names ``bench.workloads``:
``manage.py bench`` sets it for every process it starts and imports this module itself, as
``manage.py bench_step_cost`` does; the tests' workflows (tests/runs/workflows_for_tests.py)
import it too, since many tests start the cheapest run there is, ``bench.noop``.

- ``bench.noop``: one no-op step on lane read;
- ``bench.five``: five no-op steps on lane read;
- ``bench.gated``: a draft step, then a no-op step gated by one operator's approval (lane draft);
- ``bench.gated_effect``: the same with one effect in the gated step, 20 ms at a stand-in
  provider (the console's real path: approve over HTTP, the effect through the ledger);
- ``bench.agent_io``: one async step awaiting a 1 s stand-in for a model call (lane draft);
- ``bench.keyed``: one async step holding its entity key's lock for 50 ms (lane draft);
- ``bench.tool_agent``: one async step making ``calls`` governed calls of the ``bench_tool``
  tool (20 ms each at a stand-in provider), under whatever cap the bench gives that tool;
- ``bench.tool_approval``: one async step whose one governed call (20 ms) a human approves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pydantic

from runs.context import AsyncStepContext, StepContext
from runs.definitions import ApprovalPolicy, workflow

FIVE_STEPS = 5


class BenchInput(pydantic.BaseModel):
    """An empty input, ``{}`` (validated like any workflow's, so starting a run costs what it does)."""


def _noop(ctx: StepContext) -> dict[str, Any]:
    return {}


bench_noop = workflow("bench.noop", description="One no-op step (for make bench)", input=BenchInput)
bench_noop.step(key="noop", lane="read")(_noop)

bench_five = workflow("bench.five", description="Five no-op steps (for make bench)", input=BenchInput)
for _position in range(1, FIVE_STEPS + 1):
    bench_five.step(key=f"noop{_position}", lane="read")(_noop)

bench_gated = workflow(
    "bench.gated", description="A draft, then a no-op gated by an approval (make bench)", input=BenchInput
)


@bench_gated.step(key="draft", lane="draft")
def draft(ctx: StepContext) -> dict[str, Any]:
    return {"text": "bench draft"}


@bench_gated.step(key="apply", lane="draft", approval=ApprovalPolicy(required=1, roles=("operator",)))
def apply(ctx: StepContext) -> dict[str, Any]:
    return {}


bench_gated_effect = workflow(
    "bench.gated_effect",
    description="A draft, then one effect (20 ms at the provider) gated by an approval (make bench)",
    input=BenchInput,
)
PROVIDER_SECONDS = 0.02


@bench_gated_effect.step(key="draft", lane="draft")
def draft_reply(ctx: StepContext) -> dict[str, Any]:
    return {"text": "bench draft"}


def _provider_call() -> dict[str, Any]:
    time.sleep(PROVIDER_SECONDS)  # a stand-in for the provider's answer (outside world)
    return {"sent": True}


@bench_gated_effect.step(key="send", lane="draft", approval=ApprovalPolicy(required=1, roles=("operator",)))
def send(ctx: StepContext) -> dict[str, Any]:
    return ctx.effect("bench.send", _provider_call, request={"text": ctx.outputs["draft"]["text"]})


class AgentInput(pydantic.BaseModel):
    """How long the stand-in model call takes (1 s unless given)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    wait_seconds: float = pydantic.Field(default=1.0, ge=0, le=60)


bench_agent_io = workflow(
    "bench.agent_io", description="One step awaiting a stand-in model call (for make bench)", input=AgentInput
)


@bench_agent_io.step(key="await_model", lane="draft")
async def _await_model(ctx: AsyncStepContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.input.get("wait_seconds", 1.0)))
    return {}


class KeyedInput(pydantic.BaseModel):
    """Which of the bench's entity keys the run's step locks."""

    model_config = pydantic.ConfigDict(extra="forbid")
    key: int = pydantic.Field(default=0, ge=0)


bench_keyed = workflow(
    "bench.keyed", description="One step holding an entity key for 50 ms (for make bench)", input=KeyedInput
)


@bench_keyed.step(key="hold_key", lane="draft", locks=["bench_key:{key}"])
async def _hold_key(ctx: AsyncStepContext) -> dict[str, Any]:
    await asyncio.sleep(KEY_HOLD_SECONDS)
    return {}


KEY_HOLD_SECONDS = 0.05


TOOL_CALL_SECONDS = 0.02
BENCH_TOOL = "bench_tool"


class ToolAgentInput(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    calls: int = pydantic.Field(default=5, ge=1, le=100)


bench_tool_agent = workflow(
    "bench.tool_agent",
    description="An agent step of governed tool calls (for make bench)",
    input=ToolAgentInput,
)


async def _tool_call(request: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(TOOL_CALL_SECONDS)  # the provider
    return {"n": request["n"]}


@bench_tool_agent.step(key="calls", lane="draft")
async def _make_calls(ctx: AsyncStepContext) -> dict[str, Any]:
    for n in range(int(ctx.input.get("calls", 5))):
        await ctx.tool(BENCH_TOOL, _tool_call, request={"n": n})
    return {}


bench_tool_approval = workflow(
    "bench.tool_approval",
    description="One governed call a human approves mid-step (for make bench)",
    input=BenchInput,
)


@bench_tool_approval.step(key="call", lane="draft")
async def _approved_call(ctx: AsyncStepContext) -> dict[str, Any]:
    return await ctx.tool(BENCH_TOOL, _tool_call, request={"n": 0}, approval=True)
