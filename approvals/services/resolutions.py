"""A reviewer's resolution of a conflict: a compare-and-set on the conflict's version that
moves the affected step or run on, exactly once."""

from __future__ import annotations

from django.db.models import F
from django.utils import timezone

from approvals import access
from approvals.models import (
    Artifact,
    ConflictArtifact,
    ConflictKind,
    ConflictStatus,
)
from approvals.services.artifacts import EditConflict, artifact_write
from approvals.services.conflicts import audit_conflict
from core.access import member_role_check
from core.models import Role, User
from core.transactions import transaction_retried_once
from runs import ledger
from runs import services as run_services
from runs.locking import run_steps_lock
from runs.models import StepStatus


class ResolutionConflict(Exception):
    def __init__(self, current: ConflictArtifact) -> None:
        super().__init__(f"conflict {current.pk} is {current.status} at version {current.version}")
        self.current = current


class InvalidResolution(ValueError):
    """The resolution does not fit this conflict (or lacks what it needs, 400), or no longer
    fits its run (409): nothing changed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


RESOLUTIONS = {
    ConflictKind.STALE_APPROVAL: {"keep_current", "cancel_run"},
    ConflictKind.LEASE_EXPIRED_WITH_PENDING_EFFECT: {
        "mark_effect_committed",
        "mark_effect_not_sent",
        "cancel_run",
    },
    ConflictKind.STALE_TOKEN_WRITE: {"acknowledge"},
    ConflictKind.ENTITY_VERSION_MISMATCH: {"keep_current", "apply_proposed", "cancel_run"},
    ConflictKind.DUPLICATE_TRIGGER_PAYLOAD: {"acknowledge"},
    ConflictKind.CONCURRENT_EDIT: {"keep_current", "apply_proposed"},
    ConflictKind.CHANGED_INPUTS: {"apply_proposed", "cancel_run"},
    ConflictKind.COMPENSATION_FAILED: {"retry_compensation", "mark_compensated"},
}


def resolutions_for(conflict: ConflictArtifact) -> set[str]:
    """How a conflict may be resolved. A compensation step's run has already ended, so
    cancelling it (or keeping the current state) would settle nothing: a reviewer retries the
    compensation or marks it done by hand instead."""
    allowed = set(RESOLUTIONS[ConflictKind(conflict.kind)])
    step = conflict.step
    if step is None or not step.compensates:
        return allowed
    allowed -= {"cancel_run", "keep_current", "apply_proposed"}
    allowed.add("mark_compensated")
    if conflict.kind != ConflictKind.LEASE_EXPIRED_WITH_PENDING_EFFECT:  # that needs the effect settled
        allowed.add("retry_compensation")
    return allowed


def conflict_resolve(
    *,
    conflict: ConflictArtifact,
    user: User,
    expected_version: int,
    resolution: str,
    note: str = "",
    external_ref: str = "",
) -> ConflictArtifact:
    """Resolve a conflict (compare-and-set on its version) and move the affected step on, once.
    PermissionDenied for a user without the reviewer role in the conflict's tenant."""
    access.access_resolve_conflict(user, conflict.tenant.slug)
    allowed = resolutions_for(conflict)
    if resolution not in allowed:
        raise InvalidResolution(f"{conflict.kind} can be resolved with: {', '.join(sorted(allowed))}")
    if resolution == "mark_effect_committed" and not external_ref:
        raise InvalidResolution("mark_effect_committed needs the external_ref you verified with the provider")
    now = timezone.now()
    actor = user.get_username()

    def resolve() -> ConflictArtifact | None:
        if conflict.run_id is not None:
            run_steps_lock(conflict.run_id)  # the anchor: see runs/locking.py
        member_role_check(user, conflict.tenant_id, [Role.REVIEWER], "resolving this conflict")
        won = ConflictArtifact.objects.filter(
            pk=conflict.pk, version=expected_version, status=ConflictStatus.OPEN
        ).update(
            status=ConflictStatus.RESOLVED,
            resolution=resolution,
            resolved_by=user,
            resolved_at=now,
            note=note,
            version=F("version") + 1,
            updated_at=now,
        )
        if won != 1:
            return None
        current = ConflictArtifact.objects.select_related("step__run", "run", "effect").get(pk=conflict.pk)
        _apply_resolution(current, resolution, actor, note, external_ref)
        audit_conflict(current, "conflict_resolved", actor, {"resolution": resolution, "note": note})
        return current

    resolved = transaction_retried_once(resolve)
    if resolved is None:
        raise ResolutionConflict(ConflictArtifact.objects.get(pk=conflict.pk))
    return resolved


def _apply_resolution(
    conflict: ConflictArtifact, resolution: str, actor: str, note: str, external_ref: str
) -> None:
    step, run = conflict.step, conflict.run
    in_conflict = (StepStatus.CONFLICT,)
    if resolution == "cancel_run" or (
        resolution == "keep_current" and conflict.kind == ConflictKind.ENTITY_VERSION_MISMATCH
    ):
        if run is not None:
            run_services.run_cancel(
                run=run, actor=actor, reason=f"{conflict.kind} resolved by {actor}: {resolution}"
            )
    elif resolution == "mark_effect_committed" and conflict.effect is not None:
        ledger.effect_confirm_committed(
            effect_id=conflict.effect.pk, external_ref=external_ref, verified_by=actor
        )
        if step is not None:
            run_services.step_resume(step=step, actor=actor, from_statuses=in_conflict)
    elif resolution == "mark_effect_not_sent" and conflict.effect is not None:
        ledger.effect_mark_not_sent(effect_id=conflict.effect.pk, actor=actor, note=note)
        if step is not None:
            run_services.step_resume(step=step, actor=actor, from_statuses=in_conflict)
    elif resolution == "apply_proposed" and conflict.kind == ConflictKind.CHANGED_INPUTS:
        if step is not None:  # run on the inputs as they are now, remembered afresh
            run_services.step_inputs_forget(step_ids=[step.pk])
            run_services.step_resume(step=step, actor=actor, from_statuses=in_conflict)
    elif resolution == "apply_proposed" and conflict.kind == ConflictKind.ENTITY_VERSION_MISMATCH:
        if step is not None:
            run_services.step_resume(step=step, actor=actor, from_statuses=in_conflict)
    elif (
        resolution == "apply_proposed" and conflict.kind == ConflictKind.CONCURRENT_EDIT and step is not None
    ):
        artifact = Artifact.objects.get(pk=int(conflict.target_key.removeprefix("artifact:")))
        user = User.objects.get(username=actor)
        try:
            artifact_write(  # the reviewer's resolution, not an operator's edit
                artifact=artifact,
                user=user,
                expected_version=artifact.latest_version,
                content=(conflict.proposed or {}).get("content"),
            )
        except EditConflict:
            raise InvalidResolution(
                "the step already finished, so its draft can no longer change: keep_current instead",
                status=409,
            ) from None
    elif resolution == "retry_compensation" and step is not None:
        run_services.compensation_retry(step=step, actor=actor)
    elif resolution == "mark_compensated" and step is not None:
        run_services.compensation_mark_done(step=step, actor=actor, note=note)
    elif resolution == "keep_current" and conflict.kind == ConflictKind.STALE_APPROVAL and step is not None:
        # Back to waiting for a decision on the new version (only if the step is still held).
        run_services.step_await_approval(step=step, actor=actor)
