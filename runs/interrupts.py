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
