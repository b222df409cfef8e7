"""Human edits of a draft: version n+1 by compare-and-set on the latest version number. An edit
invalidates every earlier approval of the step and opens a request for the new version; a
lost edit becomes a ``concurrent_edit`` conflict holding both contents."""

from __future__ import annotations

from typing import Any

from django.db.models import F
from django.utils import timezone

from approvals import access
from approvals.models import (
    ApprovalRequest,
    ApprovalStatus,
    Artifact,
    ArtifactVersion,
    ConflictArtifact,
    ConflictKind,
)
from approvals.services.conflicts import record_conflict
from approvals.services.gate import artifact_policy, new_version, open_request
from core import services as core_services
from core.access import member_role_check
from core.models import Role, User
from core.transactions import transaction_retried_once
from runs.locking import run_steps_lock
from runs.models import StepStatus, ToolCall, ToolCallStatus


class EditConflict(Exception):
    """The edit lost: the artifact moved on (``conflict`` keeps the lost content for a reviewer)
    or its step has finished. No version was written."""

    def __init__(self, artifact: Artifact, conflict: ConflictArtifact | None) -> None:
        super().__init__(f"artifact {artifact.pk} is at version {artifact.latest_version}")
        self.artifact = artifact
        self.conflict = conflict


def artifact_edit(*, artifact: Artifact, user: User, expected_version: int, content: Any) -> ArtifactVersion:
    """Write version n+1 of an artifact (compare-and-set on its latest version number).

    Invalidates every earlier approval of the step and opens a new request for the new version.
    Two edits based on the same version: the second raises EditConflict with a
    ``concurrent_edit`` conflict artifact holding both contents. PermissionDenied for a user
    without the operator role in the artifact's tenant (checked again, locked, in the edit's
    transaction).
    """
    access.access_edit_artifact(user, artifact.tenant.slug)
    written = transaction_retried_once(
        lambda: _artifact_write(
            artifact=artifact, user=user, expected_version=expected_version, content=content, as_member=True
        )
    )
    if isinstance(written, EditConflict):
        raise written  # after the commit: the conflict it recorded is kept
    return written


def artifact_write(*, artifact: Artifact, user: User, expected_version: int, content: Any) -> ArtifactVersion:
    """The edit itself, in the caller's transaction (a reviewer applying a lost edit as a
    resolution writes through here, holding the run's anchor already)."""
    written = _artifact_write(
        artifact=artifact, user=user, expected_version=expected_version, content=content, as_member=False
    )
    if isinstance(written, EditConflict):
        raise written
    return written


def _artifact_write(
    *, artifact: Artifact, user: User, expected_version: int, content: Any, as_member: bool
) -> ArtifactVersion | EditConflict:
    run_steps_lock(artifact.run_id)  # the anchor: see runs/locking.py
    if as_member:
        member_role_check(user, artifact.tenant_id, [Role.OPERATOR], "editing this draft")
    locked = Artifact.objects.select_for_update(of=("self",)).select_related("step__run").get(pk=artifact.pk)
    if locked.step.status in (
        StepStatus.SUCCEEDED,
        StepStatus.FAILED,
        StepStatus.CANCELLED,
    ) or _settled_elsewhere(locked):
        return EditConflict(locked, None)
    if locked.latest_version == expected_version:
        return _write_version(locked, user, expected_version, content)
    # Recorded and committed, then refused: the loser's content is kept for a reviewer.
    current = locked.versions.get(number=locked.latest_version)
    lost = record_conflict(
        ConflictKind.CONCURRENT_EDIT,
        step=locked.step,
        target_key=f"artifact:{locked.pk}",
        current={"version": current.number, "author": current.author, "content": current.content},
        proposed={"based_on": expected_version, "author": user.get_username(), "content": content},
    )
    return EditConflict(locked, lost)


def _settled_elsewhere(artifact: Artifact) -> bool:
    """Nothing left to edit: a governed call's request once the call ran, or any artifact of
    a step whose attention is on another of its artifacts (one open request per step)."""
    if artifact.call_key and (
        ToolCall.objects.filter(step_id=artifact.step_id, key=artifact.call_key)
        .exclude(status=ToolCallStatus.AWAITING_APPROVAL)
        .exists()
    ):
        return True
    return (
        ApprovalRequest.objects.filter(step_id=artifact.step_id, status=ApprovalStatus.PENDING)
        .exclude(artifact=artifact)
        .exists()
    )


def _write_version(artifact: Artifact, user: User, based_on: int, content: Any) -> ArtifactVersion:
    version = new_version(artifact, content, author=user.get_username(), source="human", based_on=based_on)
    invalidated = list(
        ApprovalRequest.objects.filter(
            artifact=artifact, status__in=[ApprovalStatus.PENDING, ApprovalStatus.APPROVED]
        ).values_list("pk", flat=True)
    )
    ApprovalRequest.objects.filter(pk__in=invalidated).update(
        status=ApprovalStatus.INVALIDATED, version=F("version") + 1, updated_at=timezone.now()
    )
    open_request(artifact.step, artifact, version, artifact_policy(artifact))
    core_services.event_record(
        tenant=artifact.tenant_id,
        subject=f"run:{artifact.run_id}",
        verb="artifact_edited",
        actor=user.get_username(),
        payload={"artifact": artifact.pk, "version": version.number, "invalidated": invalidated},
    )
    return version
