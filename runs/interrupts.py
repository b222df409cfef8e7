"""Why a running step must stop: raised inside its body (from ``ctx`` calls, or by the engine)
so the body unwinds, and never recorded by the ledger as an effect that did not happen."""

from __future__ import annotations


class StepInterrupted(Exception):
    """The step must stop: its lease was lost or its run was cancelled."""


class LeaseLost(StepInterrupted):
    """The step's lease (or an entity lock's) ran out or was taken over: it no longer owns its work."""


class RunCancelled(StepInterrupted):
    """The step's run was cancelled (a compensation goes on regardless)."""


class StepTimedOut(BaseException):  # noqa: N818 — a BaseException, so no ``except Exception`` swallows it
    """Raised inside a step body that ran past its timeout. Not an ``Exception``: the ledger
    must not record an effect interrupted by it as failed (it may have happened)."""


class StepParked(BaseException):  # noqa: N818 — a BaseException, so no ``except Exception`` swallows it
    """Raised out of ``ctx.tool`` once its call's approval request is open and the step parked
    (in one transaction): the attempt ends here, holding nothing; a decision makes the step
    ready again and it runs from its start, its earlier calls answered from their record."""


class Rejected(Exception):  # noqa: N818 — what a step body catches: ``except Rejected``
    """A governed tool call whose approval was rejected, or timed out with ``reject``: the call
    did not happen. The body may handle it (answer differently, skip the call) or let it fail
    the step."""

    def __init__(self, tool: str, reason: str, approval_id: int | None = None) -> None:
        super().__init__(f"the {tool} call was not approved: {reason}")
        self.tool = tool
        self.reason = reason
        self.approval_id = approval_id
