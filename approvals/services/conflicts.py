"""Conflict artifacts: what the engine or an edit reports as a collision is kept, with the
context a reviewer needs and a suggested next step, in the reporter's transaction."""

from __future__ import annotations

from typing import Any

from django.db.models import F, QuerySet
from django.utils import timezone

from approvals.models import (
    ConflictArtifact,
    ConflictKind,
    ConflictStatus,
)
from core import services as core_services
from runs.models import Run, SideEffect, Step


def record_conflict(
    kind: str,
    *,
    step: Step | None = None,
    run: Run | None = None,
    tenant_id: int | None = None,
    target_key: str = "",
    effect: SideEffect | None = None,
    current: Any = None,
    proposed: Any = None,
    error: str = "",
    **extra: Any,
) -> ConflictArtifact:
    """Create a conflict artifact (in the caller's transaction) with its suggested next step."""
    run = run or (step.run if step else None)
    tenant = tenant_id or (step.tenant_id if step else run.tenant_id if run else None)
    assert tenant is not None
    timing = {
        "detected_at": timezone.now().isoformat(),
        **{k: v for k, v in extra.items() if isinstance(v, (int, str))},
    }
    if effect is not None:
        timing["effect_proposed_at"] = effect.proposed_at.isoformat()
    conflict = ConflictArtifact.objects.create(
        tenant_id=tenant,
        kind=kind,
        target_key=target_key
        or (f"effect:{effect.idempotency_key}" if effect else f"step:{step.pk}" if step else ""),
        run=run,
        step=step,
        effect=effect,
        current=current,
        proposed=proposed if proposed is not None else ({"error": error} if error else None),
        timing=timing,
        suggestion=SUGGESTIONS[kind],
    )
    audit_conflict(conflict, "conflict_opened", "runwarden", {"kind": kind, "error": error[:300]})
    return conflict


SUGGESTIONS: dict[str, str] = {
    ConflictKind.STALE_APPROVAL: (
        "The artifact changed after it was approved, so nothing was sent. "
        "Review the new version and approve it (that resumes the step), or cancel the run."
    ),
    ConflictKind.LEASE_EXPIRED_WITH_PENDING_EFFECT: (
        "The worker vanished while the effect was in flight. Check the provider: if it happened, mark it "
        "committed with its reference; if not, mark it not sent to retry with the same idempotency key."
    ),
    ConflictKind.STALE_TOKEN_WRITE: (
        "A worker that had lost its lease tried to write; its write was refused and the newer holder's "
        "result stands. Acknowledge, after checking the late worker caused no outside effect."
    ),
    ConflictKind.ENTITY_VERSION_MISMATCH: (
        "The record changed between read and write. Keep the current record (cancels this run's change) "
        "or apply the proposed change on top of it (retries the step)."
    ),
    ConflictKind.DUPLICATE_TRIGGER_PAYLOAD: (
        "The same trigger id arrived with a different payload and was refused. "
        "Acknowledge, and have the sender use a new id for a new event."
    ),
    ConflictKind.CONCURRENT_EDIT: (
        "Two edits started from the same version; the first one stands. "
        "Keep it, or apply the other edit on top as a new version."
    ),
    ConflictKind.CHANGED_INPUTS: (
        "The step's inputs (the run's input and the earlier steps' outputs) are not what its earlier "
        "attempt started from, so it was not run again. Compare the two: run it on the inputs as they "
        "are now, or cancel the run."
    ),
    ConflictKind.COMPENSATION_FAILED: (
        "Undoing a committed step kept failing, so the run is only partly compensated. Retry the "
        "compensation once the provider works again, or undo it by hand and mark it compensated; "
        "the remaining compensations then go on."
    ),
}


def audit_conflict(conflict: ConflictArtifact, verb: str, actor: str, payload: dict[str, Any]) -> None:
    core_services.event_record(
        tenant=conflict.tenant_id,
        subject=f"conflict:{conflict.pk}",
        verb=verb,
        actor=actor,
        payload={"run_id": conflict.run_id, "target": conflict.target_key, **payload},
    )


def settle_conflicts(step: Step, kind: str, actor: str, resolution: str) -> None:
    """Open conflicts of ``kind`` about ``step`` are resolved by what just happened."""
    _settle(
        ConflictArtifact.objects.filter(step=step, kind=kind), actor, resolution, "settled by a new approval"
    )


def settle_run_conflicts(run_id: str, kinds: tuple[str, ...], actor: str, resolution: str, note: str) -> None:
    """Open conflicts of ``kinds`` about the run are resolved by what just happened to it."""
    _settle(ConflictArtifact.objects.filter(run_id=run_id, kind__in=kinds), actor, resolution, note)


def _settle(conflicts: QuerySet[ConflictArtifact], actor: str, resolution: str, note: str) -> None:
    now = timezone.now()
    for conflict in conflicts.filter(status=ConflictStatus.OPEN):
        settled = ConflictArtifact.objects.filter(pk=conflict.pk, status=ConflictStatus.OPEN).update(
            status=ConflictStatus.RESOLVED,
            resolution=resolution,
            resolved_at=now,
            version=F("version") + 1,
            note=note[:2000],
            updated_at=now,
        )
        if settled:
            audit_conflict(conflict, "conflict_resolved", actor, {"resolution": resolution})


def conflict_hook(kind: str, **details: Any) -> None:
    """Registered with runs.gates: turn a reported collision into a conflict artifact."""
    step = details.pop("step", None)
    token = details.pop("token", None)
    if kind == ConflictKind.STALE_TOKEN_WRITE and step is not None:
        details.setdefault("target_key", f"step:{step.pk}")
        details.setdefault(
            "current", {"output": Step.objects.filter(pk=step.pk).values_list("output", flat=True).first()}
        )
        details["proposed"] = {"token": token, "output": details.get("proposed")}
    record_conflict(kind, step=step, **details)
