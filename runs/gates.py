"""The approval gate: how execution asks "may this step act?" without knowing about humans.

``runs`` defines the interface; the approvals app registers its implementation in its
AppConfig.ready. Without a registered gate, a step that needs approval fails loudly rather
than running unapproved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from runs.definitions import ApprovalPolicy, StepSpec
from runs.models import Run, Step


@dataclass(frozen=True)
class GateVerdict:
    """What the approval gate (runs.gates) said of a gated step. ``approved``: run the body
    with ``content`` (the approved artifact version's content). ``waiting``: park the step until
    a decision resumes it. ``rejected``: fail the step."""

    state: str  # approved | waiting | rejected
    content: Any = None
    reason: str = ""
    approval_id: int | None = None
    artifact_version_id: int | None = None


class ApprovalGate(Protocol):
    def check(self, *, run: Run, step: Step, spec: StepSpec, draft: Any) -> GateVerdict:
        """Called in the transaction that starts a gated step; ``draft`` is the previous step's output."""
        ...

    def guard_effect(self, *, step: Step, verdict: GateVerdict) -> None:
        """Called in the transaction that proposes the step's effect: raise if the approval is
        no longer valid (the artifact was edited since, or the approval was invalidated)."""
        ...

    def check_call(
        self,
        *,
        run: Run,
        step: Step,
        call_key: str,
        tool: str,
        request: dict[str, Any],
        policy: ApprovalPolicy,
    ) -> GateVerdict:
        """Called in the transaction that parks the step if need be (holding the run's anchor):
        the verdict on one governed call's proposed ``request`` (``content``: the approved,
        possibly edited, request)."""
        ...

    def guard_call(self, *, step: Step, call_key: str, verdict: GateVerdict) -> None:
        """``guard_effect`` for an approved call: raise if its request was edited or its
        approval invalidated since."""
        ...

    def withdraw(self, *, run_id: str, actor: str, reason: str) -> None:
        """Called in the transaction that cancels a run: its undecided approvals (and the
        conflicts about its drafts) close, so a decision that comes later is told the run is
        gone instead of approving nothing."""
        ...


class NoGate(Exception):
    pass


def withdraw_decisions(*, run_id: str, actor: str, reason: str) -> None:
    """A cancelled run's undecided approvals close (nothing to close without a gate)."""
    if _gate is not None:
        _gate.withdraw(run_id=run_id, actor=actor, reason=reason)


_gate: ApprovalGate | None = None


def register_gate(gate: ApprovalGate) -> None:
    global _gate
    _gate = gate


def get_gate() -> ApprovalGate:
    if _gate is None:
        raise NoGate("this step needs approval but no approval gate is installed")
    return _gate


class ApprovalNoLongerValid(Exception):
    """Raised by the gate's effect guard: the approval was invalidated or the artifact edited
    after it was approved. The effect does not happen; the step goes to ``conflict``."""

    def __init__(self, message: str, approval_id: int | None = None) -> None:
        super().__init__(message)
        self.approval_id = approval_id


class EntityChanged(Exception):
    """A step body raises this when the entity it read changed before its write (an optimistic
    check failed): the step goes to ``conflict`` for a reviewer instead of a blind retry."""

    def __init__(self, key: str, *, expected: Any, actual: Any, proposed: Any = None) -> None:
        super().__init__(f"{key} changed: expected {expected}, found {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual
        self.proposed = proposed


ConflictHook = Callable[..., None]
_conflict_hooks: list[ConflictHook] = []


def register_conflict_hook(hook: ConflictHook) -> None:
    """The approvals app turns reported collisions into conflict artifacts."""
    if hook not in _conflict_hooks:
        _conflict_hooks.append(hook)


def report_conflict(kind: str, **details: Any) -> None:
    """Report a collision (call it in the transaction that records the affected state)."""
    for hook in list(_conflict_hooks):
        hook(kind=kind, **details)
