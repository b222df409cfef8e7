"""Workflows in Python: a workflow is an ordered list of steps, declared with decorators.

    from runs.context import StepContext
    from runs.definitions import workflow

    crm_update = workflow("demo.crm_update", description="Update one CRM contact")

    @crm_update.step(lane="external", tool="crm", locks=["crm_contact:{contact_id}"])
    def apply_changes(ctx: StepContext) -> dict:
        ...

Steps run in declaration order, each only after the previous one succeeded. Lock keys are
templates filled from the run input and the outputs of earlier steps. Modules named
``workflows`` in installed apps are imported at start-up (see RunsConfig.ready).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runs.context import StepContext

LANES = ("read", "draft", "external", "high_risk")
LOCK_POLICIES = ("wait", "skip", "cancel_newest", "cancel_in_progress")

StepBody = Callable[["StepContext"], Any]


class UnknownWorkflow(LookupError):
    pass


class WorkflowDefinitionError(ValueError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 60.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter for the retry after ``attempt`` (1-based)."""
        ceiling = min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class ApprovalPolicy:
    """How a gated step is approved (enforced by the approvals app through the gate)."""

    required: int = 1
    roles: tuple[str, ...] = ("operator",)
    allow_self_approval: bool = False
    timeout_seconds: float | None = None
    on_timeout: str = "reject"  # reject | escalate | auto_approve (low-risk lanes only)
    redraft_step: str = ""  # the step "request changes" sends the run back to


@dataclass(frozen=True)
class StepSpec:
    key: str
    body: StepBody
    lane: str = "read"
    tool: str = ""
    locks: tuple[str, ...] = ()
    lock_policy: str = "wait"
    approval: ApprovalPolicy | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_seconds: float = 300.0
    lease_seconds: float | None = None

    def lock_keys(self, context: Mapping[str, Any]) -> list[str]:
        """The step's entity lock keys, filled from the run input and earlier outputs."""
        keys = []
        for template in self.locks:
            try:
                keys.append(template.format_map(_StrictMap(context)))
            except KeyError as missing:
                raise WorkflowDefinitionError(
                    f"lock {template!r} of step {self.key!r} needs {missing} "
                    "in the input or an earlier output"
                ) from None
        return sorted(set(keys))


class _StrictMap(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


@dataclass
class Workflow:
    key: str
    description: str = ""
    steps: list[StepSpec] = field(default_factory=list)

    def step(
        self,
        *,
        key: str = "",
        lane: str = "read",
        tool: str = "",
        locks: list[str] | tuple[str, ...] = (),
        lock_policy: str = "wait",
        approval: ApprovalPolicy | bool | None = None,
        max_attempts: int = 3,
        backoff_seconds: float = 1.0,
        backoff_max_seconds: float = 60.0,
        timeout_seconds: float = 300.0,
        lease_seconds: float | None = None,
    ) -> Callable[[StepBody], StepBody]:
        """Declare the next step of this workflow (steps run in declaration order)."""

        def register(body: StepBody) -> StepBody:
            step_key = key or body.__name__
            if lane not in LANES:
                raise WorkflowDefinitionError(f"step {step_key!r}: lane must be one of {', '.join(LANES)}")
            if lock_policy not in LOCK_POLICIES:
                raise WorkflowDefinitionError(
                    f"step {step_key!r}: lock_policy must be one of {LOCK_POLICIES}"
                )
            if any(s.key == step_key for s in self.steps):
                raise WorkflowDefinitionError(f"workflow {self.key!r} already has a step {step_key!r}")
            if max_attempts < 1:
                raise WorkflowDefinitionError(f"step {step_key!r}: max_attempts must be at least 1")
            for template in locks:
                for _, name, _, _ in string.Formatter().parse(template):
                    if name is not None and not name.isidentifier():
                        raise WorkflowDefinitionError(f"step {step_key!r}: bad lock template {template!r}")
            policy = ApprovalPolicy() if approval is True else (approval or None)
            if policy and policy.on_timeout == "auto_approve" and lane in ("external", "high_risk"):
                raise WorkflowDefinitionError(f"step {step_key!r}: auto_approve is for low-risk lanes only")
            self.steps.append(
                StepSpec(
                    key=step_key,
                    body=body,
                    lane=lane,
                    tool=tool,
                    locks=tuple(locks),
                    lock_policy=lock_policy,
                    approval=policy,
                    retry=RetryPolicy(max_attempts, backoff_seconds, backoff_max_seconds),
                    timeout_seconds=timeout_seconds,
                    lease_seconds=lease_seconds,
                )
            )
            return body

        return register

    def spec(self, step_key: str) -> StepSpec:
        for spec in self.steps:
            if spec.key == step_key:
                return spec
        raise UnknownWorkflow(f"workflow {self.key!r} has no step {step_key!r}")


REGISTRY: dict[str, Workflow] = {}


def workflow(key: str, *, description: str = "") -> Workflow:
    """Declare a workflow and register it under ``key``."""
    if key in REGISTRY:
        raise WorkflowDefinitionError(f"workflow {key!r} is declared twice")
    REGISTRY[key] = Workflow(key=key, description=description)
    return REGISTRY[key]


def get_workflow(key: str) -> Workflow:
    try:
        workflow_def = REGISTRY[key]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise UnknownWorkflow(f"unknown workflow {key!r} (known: {known})") from None
    if not workflow_def.steps:
        raise UnknownWorkflow(f"workflow {key!r} has no steps")
    return workflow_def
