"""Workflows in Python: a workflow is an ordered list of steps, declared with decorators.

    from pydantic import Field

    from runs.context import AsyncStepContext, StepContext
    from runs.definitions import WorkflowInput, workflow

    class CrmUpdateInput(WorkflowInput):
        contact_id: int = Field(ge=1)
        changes: dict[str, str]

    crm_update = workflow("demo.crm_update", description="Update one CRM contact", input=CrmUpdateInput)

    @crm_update.step(lane="external", tool="crm", locks=["crm_contact:{contact_id}"])
    def apply_changes(ctx: StepContext) -> dict:
        ...

Steps run in declaration order, each only after the previous one succeeded. Lock keys are
templates filled from the run input and the outputs of earlier steps. Modules named
``workflows`` in installed apps are imported at start-up (see RunsConfig.ready).

The input is checked at the door: ``run_start`` calls ``Workflow.validate_input``, which
validates it against the workflow's ``input`` model (a pydantic model) and stores the
normalized result (``model_dump(mode="json")``, e.g. a decimal amount "120" becomes "120.00").
Input that does not fit raises InvalidInput with one message per field, keyed by dotted path,
and nothing is stored.

Input models forbid extra fields by default (``extra="forbid"``), so a misspelt field is
refused rather than silently dropped: WorkflowInput sets it (subclass it for nested models
too), and a top-level model whose config does not say is registered with it. An integrator
opts out with their own ``model_config = ConfigDict(extra="ignore")`` (or "allow").
A workflow without a model accepts any JSON object. In every case values PostgreSQL cannot
store are refused: a NUL character (U+0000) in any key or string, a NaN or infinite number.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import operator
import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeAlias

import pydantic

from core.services import DEADLOCK_POLICIES
from core.validation import dotted_path, unstorable_values

LANES = ("read", "draft", "external", "high_risk")
LOCK_POLICIES = ("wait", "skip", "cancel_newest", "cancel_in_progress")
OVERFLOW_POLICIES = ("queue", "reject", "cancel_oldest_waiting")

# A step body: a plain function of a StepContext, or an ``async def`` of an AsyncStepContext
# (runs.context, which builds on this module: named here, not imported).
StepBody: TypeAlias = Callable[..., Any]
# A compensation: given the step's context and its committed effects' results by kind.
Compensation: TypeAlias = Callable[..., Any]
COMPENSATE_PREFIX = "compensate:"
COMPENSATION_ATTEMPTS = 5


class UnknownWorkflow(LookupError):
    pass


class WorkflowDefinitionError(ValueError):
    pass


class InvalidInput(ValueError):
    """A run input that does not fit its workflow: ``fields`` maps a dotted path within the
    input ("changes.stage", "items.0.sku"; "__all__" for the input as a whole) to its message."""

    def __init__(self, fields: dict[str, str], message: str = "") -> None:
        self.fields = fields
        super().__init__(
            message or "invalid input: " + "; ".join(f"{path}: {msg}" for path, msg in fields.items())
        )


class WorkflowInput(pydantic.BaseModel):
    """Base for workflow input models: extra fields are refused (see the module docstring)."""

    model_config = pydantic.ConfigDict(extra="forbid")


def pydantic_fields(error: pydantic.ValidationError) -> dict[str, str]:
    """A pydantic error as {dotted path: message}; several messages for one path are joined."""
    fields: dict[str, str] = {}
    for item in error.errors(include_url=False):
        path = dotted_path(item["loc"])
        fields[path] = f"{fields[path]}; {item['msg']}" if path in fields else item["msg"]
    return fields


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
class SessionPolicy:
    """How runs of one session (one tenant, one ``session_key``) share it.

    At most ``max_concurrent`` runs of a session execute at once, whole run after whole run
    (a run waiting for an approval keeps its place), in start order, or in ``sequence`` order
    when the runs carry one. A run that waited ``queue_timeout_seconds`` ends ``expired``. When
    ``max_waiting`` runs already wait, ``overflow`` decides: ``queue`` (no bound; the default),
    ``reject`` (the new run is refused: 429 with Retry-After) or ``cancel_oldest_waiting``
    (the oldest waiting run is cancelled to make room). A run whose ``sequence`` is ahead of
    the next expected number waits at most ``sequence_gap_seconds`` for the missing ones.
    """

    max_concurrent: int = 1
    queue_timeout_seconds: float | None = None
    overflow: str = "queue"
    max_waiting: int | None = None
    sequence_gap_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise WorkflowDefinitionError("session max_concurrent must be at least 1")
        if self.overflow not in OVERFLOW_POLICIES:
            raise WorkflowDefinitionError(f"session overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
        if self.overflow == "queue" and self.max_waiting is not None:
            raise WorkflowDefinitionError(
                "session max_waiting bounds the queue: pick overflow reject or cancel_oldest_waiting"
            )
        week = 7 * 24 * 3600.0
        if self.queue_timeout_seconds is not None and not 0 < self.queue_timeout_seconds <= 52 * week:
            raise WorkflowDefinitionError("session queue_timeout_seconds must be between 0 and a year")
        if not 0 <= self.sequence_gap_seconds <= week:
            raise WorkflowDefinitionError("session sequence_gap_seconds must be between 0 and a week")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise WorkflowDefinitionError("session max_waiting may not be negative")

    @property
    def waiting_limit(self) -> int | None:
        """How many runs may wait before ``overflow`` applies (None: no bound)."""
        if self.overflow == "queue":
            return None
        if self.max_waiting is not None:
            return self.max_waiting
        return 0 if self.overflow == "reject" else 1


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
    compensate: Compensation | None = None

    def compensation_spec(self) -> StepSpec:
        """The step that undoes this one (``compensate:<key>``): same lane, tool and locks, its
        own retry budget, its body the compensation given this step's committed effects."""
        assert self.compensate is not None
        return StepSpec(
            key=COMPENSATE_PREFIX + self.key,
            body=(
                partial(_run_compensation_async, self)
                if inspect.iscoroutinefunction(self.compensate)
                else partial(_run_compensation, self)
            ),
            lane=self.lane,
            tool=self.tool,
            locks=self.locks,
            retry=RetryPolicy(
                COMPENSATION_ATTEMPTS, self.retry.backoff_seconds, self.retry.backoff_max_seconds
            ),
            timeout_seconds=self.timeout_seconds,
            lease_seconds=self.lease_seconds,
        )

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


class EffectStillInFlight(RuntimeError):
    """An effect of the step to undo has no outcome yet (its cancelled body may still be running
    it): the compensation is retried later, and a reviewer decides if it never settles."""


def _run_compensation(original: StepSpec, ctx: Any) -> Any:  # ctx: a StepContext
    assert original.compensate is not None
    _refuse_in_flight(original, ctx.in_flight_effects(original.key))
    results = ctx.committed_effects(original.key)
    if not results:
        return {"nothing_to_undo": True}
    return original.compensate(ctx, results)  # a plain compensation


async def _run_compensation_async(original: StepSpec, ctx: Any) -> Any:  # an AsyncStepContext
    assert original.compensate is not None
    _refuse_in_flight(original, await ctx.in_flight_effects(original.key))
    results = await ctx.committed_effects(original.key)
    if not results:
        return {"nothing_to_undo": True}
    return await original.compensate(ctx, results)  # an async one


def _refuse_in_flight(original: StepSpec, in_flight: list[str]) -> None:
    if in_flight:
        raise EffectStillInFlight(
            f"effect {', '.join(in_flight)} of step {original.key!r} has no outcome yet; "
            "undoing it waits until it has one"
        )


class _StrictMap(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


@dataclass
class Workflow:
    key: str
    description: str = ""
    steps: list[StepSpec] = field(default_factory=list)
    input: type[pydantic.BaseModel] | None = None
    session: SessionPolicy = field(default_factory=SessionPolicy)
    declared_version: int | None = None
    connections: tuple[str, ...] = ()  # providers a run binds a connection for at start
    # Which wait gives way when its steps' lock waits form a cycle (core.deadlocks).
    deadlock_policy: str = ""  # "": its tenant's (TenantQuota.deadlock_policy)
    # The digest and the steps it was computed from (a worker asks for it on every step).
    _digest: tuple[tuple[StepSpec, ...], str] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def version(self) -> str:
        """The version a run pins: the declared one, else a digest of the step list (keys,
        lanes, tools, locks and policies), so any change to the steps is a new version."""
        if self.declared_version is not None:
            return str(self.declared_version)
        steps = tuple(self.steps)
        digest = self._digest
        if digest is not None and len(digest[0]) == len(steps) and all(map(operator.is_, digest[0], steps)):
            return digest[1]
        shape = [
            [s.key, s.lane, s.tool, list(s.locks), s.lock_policy, bool(s.approval), s.retry.max_attempts]
            + ([True] if s.compensate else [])
            for s in self.steps
        ]
        self._digest = (steps, "h" + hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:11])
        return self._digest[1]

    def validate_input(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The run input, validated against the workflow's input model and normalized to what is
        stored (``model_dump(mode="json")``); without a model, the input as given.

        Raises InvalidInput with every field error, and for any value PostgreSQL cannot store
        (a NUL character, a non-finite number), with or without a model.
        """
        fields = unstorable_values(raw)
        normalized: dict[str, Any] = dict(raw)
        if self.input is not None:
            try:
                normalized = self.input.model_validate(raw).model_dump(mode="json")
            except pydantic.ValidationError as exc:
                fields = {**pydantic_fields(exc), **fields}
        if not fields:
            # A model's own serializers may still produce what cannot be stored.
            fields = unstorable_values(normalized)
        if fields:
            raise InvalidInput(fields, f"the input does not fit workflow {self.key!r}")
        return normalized

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
        compensate: Compensation | None = None,
    ) -> Callable[[StepBody], StepBody]:
        """Declare the next step of this workflow (steps run in declaration order).

        ``compensate(ctx, results)`` undoes the step: when its run fails or is cancelled after
        the step committed effects, compensations run in reverse step order, each as a step of
        its own (``compensate:<key>``) whose effects go through the ledger under their own keys.
        ``results`` maps each committed effect's kind to its recorded result.
        """

        def register(body: StepBody) -> StepBody:
            step_key: str = key or getattr(body, "__name__", "")
            if not step_key:
                raise WorkflowDefinitionError("a step needs a key= when its body has no __name__")
            for role, fn in (("body", body), ("compensation", compensate)):
                if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
                    # Its output would be a generator object, which no step can store.
                    raise WorkflowDefinitionError(
                        f"step {step_key!r}: the {role} must return its result (a function or an "
                        "async function), not yield it"
                    )
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
                    compensate=compensate,
                )
            )
            return body

        return register

    def spec(self, step_key: str) -> StepSpec:
        if step_key.startswith(COMPENSATE_PREFIX):
            original = self.spec(step_key.removeprefix(COMPENSATE_PREFIX))
            if original.compensate is None:
                raise UnknownWorkflow(
                    f"step {original.key!r} of workflow {self.key!r} no longer has a compensation"
                )
            return original.compensation_spec()
        for spec in self.steps:
            if spec.key == step_key:
                return spec
        raise UnknownWorkflow(f"workflow {self.key!r} has no step {step_key!r}")


# The newest version of each workflow (what new runs start on), and every registered version.
REGISTRY: dict[str, Workflow] = {}
VERSIONS: dict[str, list[Workflow]] = {}


def workflow(
    key: str,
    *,
    description: str = "",
    input: type[pydantic.BaseModel] | None = None,
    version: int | None = None,
    session: SessionPolicy | None = None,
    connections: tuple[str, ...] | list[str] = (),
    deadlock_policy: str = "",
) -> Workflow:
    """Declare a workflow and register it under ``key``; ``input`` is the pydantic model its run
    input must fit (see the module docstring). ``version`` (an integer) lets two versions of
    one workflow live side by side, so runs in flight finish on the one they started with;
    the highest is the one new runs take. ``session`` says how runs of one session share it.
    ``connections`` names the providers (``crm``, ``messaging``, ...) whose connection a run
    binds when it starts; steps reach them with ``ctx.connection(provider)``.
    ``deadlock_policy``: when lock waits of its steps close a cycle, which wait gives way —
    ``kill_youngest_waiter`` or ``kill_oldest_waiter`` (core.deadlocks); unset, its tenant's
    (``TenantQuota.deadlock_policy``, the youngest by default).
    """
    if deadlock_policy and deadlock_policy not in DEADLOCK_POLICIES:
        raise WorkflowDefinitionError(f"deadlock_policy must be one of {', '.join(DEADLOCK_POLICIES)}")
    earlier = VERSIONS.get(key, [])
    if any(w.declared_version == version for w in earlier) or (earlier and version is None):
        raise WorkflowDefinitionError(
            f"workflow {key!r} is declared twice (give each declaration its own version=)"
        )
    if earlier and any(w.declared_version is None for w in earlier):
        raise WorkflowDefinitionError(f"workflow {key!r}: declare version= on every declaration")
    if input is not None and "extra" not in input.model_config:
        # Forbid extra fields unless the model says otherwise (a subclass, same name).
        input = type(
            input.__name__,
            (input,),
            {
                "__module__": input.__module__,
                "__qualname__": input.__qualname__,
                "model_config": pydantic.ConfigDict(extra="forbid"),
            },
        )
    declared = Workflow(
        key=key,
        description=description,
        input=input,
        session=session or SessionPolicy(),
        declared_version=version,
        connections=tuple(connections),
        deadlock_policy=deadlock_policy,
    )
    VERSIONS[key] = sorted([*earlier, declared], key=lambda w: w.declared_version or 0)
    REGISTRY[key] = VERSIONS[key][-1]
    return declared


def unregister(key: str, version: str | None = None) -> None:
    """Forget a workflow (every version, or one): as a deploy that removed it would."""
    kept = [w for w in VERSIONS.pop(key, []) if version and w.version != version]
    REGISTRY.pop(key, None)
    if kept:
        VERSIONS[key] = kept
        REGISTRY[key] = kept[-1]


def get_workflow(key: str, version: str | None = None) -> Workflow:
    """The workflow ``key`` (its newest version), or exactly ``version`` of it: a run's pinned
    version. Raises UnknownWorkflow when that version is no longer registered."""
    if key not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise UnknownWorkflow(f"unknown workflow {key!r} (known: {known})")
    if version:
        matching = [w for w in VERSIONS[key] if w.version == version]
        if not matching:
            registered = ", ".join(w.version for w in VERSIONS[key])
            raise UnknownWorkflow(
                f"workflow {key!r} version {version} is no longer registered (registered: {registered})"
            )
        workflow_def = matching[0]
    else:
        workflow_def = REGISTRY[key]
    if not workflow_def.steps:
        raise UnknownWorkflow(f"workflow {key!r} has no steps")
    return workflow_def


def cap_names() -> dict[str, list[str]]:
    """What a tenant may put a cap on: registered workflows, the lanes, and every tool a
    registered step (of any version) calls."""
    tools = {spec.tool for versions in VERSIONS.values() for w in versions for spec in w.steps if spec.tool}
    return {"workflow": sorted(REGISTRY), "lane": list(LANES), "tool": sorted(tools)}
