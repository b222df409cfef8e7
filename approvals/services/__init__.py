"""Approvals and conflict artifacts: every write of the approvals app goes through here.

Layered, each module importing only those above it:

- ``conflicts``: conflict artifacts recorded in the reporter's transaction.
- ``gate``: the executor's gate; the step's artifact, its versions and approval requests
  (withdrawn when their run is cancelled).
- ``artifacts``: human edits of a draft (version n+1, earlier approvals invalidated).
- ``resolutions``: a reviewer's resolution of a conflict, applied exactly once.
- ``decisions``: approve / reject / request changes, and timeouts.

Callers use the names below (``services.approval_decide``); the modules are the layout.
"""

from __future__ import annotations

from approvals.services.artifacts import EditConflict, artifact_edit
from approvals.services.conflicts import conflict_hook, record_conflict
from approvals.services.decisions import (
    DecisionConflict,
    DecisionForbidden,
    approval_decide,
    approvals_expire,
)
from approvals.services.gate import ApprovalGate
from approvals.services.resolutions import (
    InvalidResolution,
    ResolutionConflict,
    conflict_resolve,
    resolutions_for,
)

__all__ = [
    "ApprovalGate",
    "DecisionConflict",
    "DecisionForbidden",
    "EditConflict",
    "InvalidResolution",
    "ResolutionConflict",
    "approval_decide",
    "approvals_expire",
    "artifact_edit",
    "conflict_hook",
    "conflict_resolve",
    "record_conflict",
    "resolutions_for",
]
