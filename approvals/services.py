"""Approvals and conflict artifacts.

Every decision is a compare-and-set on ``ApprovalRequest.version`` (one conditional UPDATE):
of two tabs, two operators, or a timeout racing a human, exactly one wins and the step
resumes exactly once; the loser changes nothing and gets the current state back. An edit of
the artifact creates version n+1, invalidates every earlier approval of that step and opens a
new request; the executor re-checks the approval in the transaction that proposes the effect.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from approvals import access, notifications
from approvals.models import (
    ApprovalRequest,
    ApprovalStatus,
    ApprovalVote,
    Artifact,
    ArtifactVersion,
    ConflictArtifact,
    ConflictKind,
    ConflictStatus,
)
from core import metrics
from core import services as core_services
from core.models import Membership, Role, User
from core.selectors import ROLE_GRANTS
from runs import ledger
from runs import services as run_services
from runs.definitions import StepSpec, UnknownWorkflow, get_workflow
from runs.gates import ApprovalNoLongerValid, GateVerdict
from runs.models import Run, SideEffect, Step, StepStatus


class DecisionConflict(Exception):
    """The caller's version is stale or the request is no longer pending: nothing changed."""

    def __init__(self, current: ApprovalRequest) -> None:
        super().__init__(f"approval {current.pk} is {current.status} at version {current.version}")
        self.current = current


class DecisionForbidden(Exception):
    """The user may not decide this request (role, self-approval, already voted)."""


class EditConflict(Exception):
    def __init__(self, artifact: Artifact, conflict: ConflictArtifact | None) -> None:
        super().__init__(f"artifact {artifact.pk} is at version {artifact.latest_version}")
        self.artifact = artifact
        self.conflict = conflict


class ResolutionConflict(Exception):
    def __init__(self, current: ConflictArtifact) -> None:
        super().__init__(f"conflict {current.pk} is {current.status} at version {current.version}")
        self.current = current


class InvalidResolution(ValueError):
    pass


def _spec(step: Step) -> StepSpec | None:
    try:
        return get_workflow(step.run.workflow, step.run.workflow_version).spec(step.key)
    except UnknownWorkflow:
        return None


def _open_request(
    step: Step, artifact: Artifact, version: ArtifactVersion, spec: StepSpec | None
) -> ApprovalRequest:
    policy = spec.approval if spec else None
    timeout = policy.timeout_seconds if policy else None
    request = ApprovalRequest.objects.create(
        tenant_id=step.tenant_id,
        run_id=step.run_id,
        step=step,
        artifact=artifact,
        artifact_version=version,
        required=policy.required if policy else 1,
        eligible_roles=list(policy.roles) if policy else [Role.OPERATOR],
        expires_at=timezone.now() + timedelta(seconds=timeout) if timeout else None,
    )
    notifications.notify(request, "approval_requested")  # in this transaction, through the outbox
    return request


def _new_version(
    artifact: Artifact, content: Any, author: str, source: str, based_on: int | None
) -> ArtifactVersion:
    number = (artifact.versions.order_by("-number").values_list("number", flat=True).first() or 0) + 1
    Artifact.objects.filter(pk=artifact.pk).update(latest_version=number, updated_at=timezone.now())
    artifact.latest_version = number
    return ArtifactVersion.objects.create(
        artifact=artifact, number=number, content=content, author=author, source=source, based_on=based_on
    )


class ApprovalGate:
    """The approvals app's implementation of runs.gates.ApprovalGate."""

    def check(self, *, run: Run, step: Step, spec: StepSpec, draft: Any) -> GateVerdict:
        artifact = Artifact.objects.select_for_update().filter(step=step).first()
        if artifact is None:
            artifact = Artifact.objects.create(
                tenant_id=step.tenant_id, run=run, step=step, kind=spec.tool or spec.lane, latest_version=0
            )
            version = _new_version(artifact, draft, author=run.actor, source="agent", based_on=None)
            request = _open_request(step, artifact, version, spec)
            core_services.event_record(
                tenant=step.tenant_id,
                subject=f"run:{run.id}",
                verb="approval_requested",
                actor="executor",
                payload={"step": step.key, "approval_id": request.pk, "artifact_version": version.number},
            )
            return GateVerdict("waiting", approval_id=request.pk)
        latest = artifact.versions.get(number=artifact.latest_version)
        newest = ApprovalRequest.objects.filter(step=step).order_by("-id").first()
        assert newest is not None
        request = newest
        if request.status == ApprovalStatus.APPROVED and request.artifact_version_id == latest.pk:
            return GateVerdict(
                "approved", content=latest.content, approval_id=request.pk, artifact_version_id=latest.pk
            )
        if request.status == ApprovalStatus.PENDING:
            return GateVerdict("waiting", approval_id=request.pk)
        decided_before_retry = step.retried_at is not None and request.created_at < step.retried_at
        if request.status in (ApprovalStatus.REJECTED, ApprovalStatus.EXPIRED) and not decided_before_retry:
            return GateVerdict("rejected", reason=request.comment or request.status, approval_id=request.pk)
        # Below: changes were requested, the approval was invalidated, or an operator retried the
        # run after a rejection or expiry — a new request for the latest version.
        if draft is not None and draft != latest.content:
            latest = _new_version(artifact, draft, author=run.actor, source="agent", based_on=latest.number)
        request = _open_request(step, artifact, latest, spec)
        return GateVerdict("waiting", approval_id=request.pk)

    def guard_effect(self, *, step: Step, verdict: GateVerdict) -> None:
        # Locks the artifact row: an edit either committed before (then we refuse) or waits
        # until this proposal commits (then the approved version is what is sent).
        artifact = Artifact.objects.select_for_update().get(step=step)
        request = (
            ApprovalRequest.objects.filter(pk=verdict.approval_id).first()
            if verdict.approval_id is not None
            else None
        )
        latest_id = (
            artifact.versions.filter(number=artifact.latest_version).values_list("pk", flat=True).first()
        )
        if (
            request is None
            or request.status != ApprovalStatus.APPROVED
            or verdict.artifact_version_id != latest_id
        ):
            raise ApprovalNoLongerValid(
                f"the approval of step {step.key} no longer holds: the artifact is at version "
                f"{artifact.latest_version} and the approval is {request.status if request else 'gone'}"
            )


def _can_decide(user: User, request: ApprovalRequest) -> None:
    membership = Membership.objects.filter(user=user, tenant_id=request.tenant_id).first()
    if membership is None:
        raise DecisionForbidden("not a member of this tenant")
    roles = [Role.ADMIN] if request.escalated else (request.eligible_roles or [Role.OPERATOR])
    if not any(role in ROLE_GRANTS[membership.role] for role in roles):
        raise DecisionForbidden(f"this approval needs one of the roles: {', '.join(roles)}")


def _blocks_self_approval(user: User, request: ApprovalRequest) -> bool:
    spec = _spec(request.step)
    if spec and spec.approval and spec.approval.allow_self_approval:
        return False
    return user.get_username() in {request.run.actor, request.artifact_version.author}


def approval_decide(
    *, request: ApprovalRequest, user: User, decision: str, expected_version: int, comment: str = ""
) -> ApprovalRequest:
    """Approve, reject or request changes, as a compare-and-set on ``expected_version``.

    Raises DecisionConflict (stale version or already decided; nothing changed) or
    DecisionForbidden. An approval that reaches the quorum resumes the step, exactly once.
    """
    if decision not in ("approve", "reject", "request_changes"):
        raise ValueError(f"unknown decision {decision!r}")
    _can_decide(user, request)
    if decision == "approve" and _blocks_self_approval(user, request):
        raise DecisionForbidden("you started this run or wrote this version: someone else must approve it")
    now = timezone.now()
    with transaction.atomic():
        pending = ApprovalRequest.objects.filter(
            pk=request.pk, version=expected_version, status=ApprovalStatus.PENDING
        )
        if decision == "approve":
            won = pending.update(
                approvals=F("approvals") + 1,
                version=F("version") + 1,
                decided_by=user,
                decided_at=now,
                comment=comment,
                updated_at=now,
            )
            if won == 1:
                try:
                    with transaction.atomic():
                        ApprovalVote.objects.create(request_id=request.pk, user=user)
                except IntegrityError:
                    transaction.set_rollback(True)
                    raise DecisionForbidden(
                        "you already approved this request; it needs another approver"
                    ) from None
                # The quorum is reached when the approvals counted so far cover the requirement.
                ApprovalRequest.objects.filter(
                    pk=request.pk, status=ApprovalStatus.PENDING, approvals__gte=F("required")
                ).update(status=ApprovalStatus.APPROVED)
        else:
            status = ApprovalStatus.REJECTED if decision == "reject" else ApprovalStatus.CHANGES_REQUESTED
            won = pending.update(
                status=status,
                version=F("version") + 1,
                decided_by=user,
                decided_at=now,
                comment=comment,
                updated_at=now,
            )
        if won == 1:
            current = ApprovalRequest.objects.select_related("step__run", "artifact_version").get(
                pk=request.pk
            )
            _after_decision(current, user.get_username(), decision, comment)
    if won != 1:
        # Lost the compare-and-set: nothing was written; show who won, when, on which version.
        raise DecisionConflict(
            ApprovalRequest.objects.select_related("decided_by", "artifact_version").get(pk=request.pk)
        )
    metrics.APPROVAL_DECISIONS.labels(
        outcome=decision if current.status != ApprovalStatus.PENDING else "vote"
    ).inc()
    return current


def _after_decision(request: ApprovalRequest, actor: str, decision: str, comment: str) -> None:
    step = request.step
    core_services.event_record(
        tenant=request.tenant_id,
        subject=f"run:{request.run_id}",
        verb=f"approval_{request.status}" if request.status != ApprovalStatus.PENDING else "approval_vote",
        actor=actor,
        payload={
            "approval_id": request.pk,
            "version": request.version,
            "artifact_version": request.artifact_version.number,
            "approvals": request.approvals,
            "required": request.required,
            "comment": comment,
        },
    )
    if request.status == ApprovalStatus.APPROVED:
        # Resumes a waiting step; also a step held in conflict because an edit made its
        # earlier approval stale — approving the new version settles that conflict.
        resumed = run_services.step_resume(
            step=step, actor=actor, from_statuses=(StepStatus.WAITING_APPROVAL, StepStatus.CONFLICT)
        )
        if resumed:
            _settle_conflicts(step, ConflictKind.STALE_APPROVAL, actor, "approved_new_version")
    elif request.status == ApprovalStatus.REJECTED:
        run_services.step_fail(
            step=step,
            actor=actor,
            reason=f"rejected by {actor}: {comment}".strip(": "),
            from_statuses=(StepStatus.WAITING_APPROVAL,),
        )
    elif request.status == ApprovalStatus.CHANGES_REQUESTED:
        spec = _spec(step)
        redraft = spec.approval.redraft_step if spec and spec.approval else ""
        if not redraft:
            prior = (
                Step.objects.filter(run_id=step.run_id, position__lt=step.position)
                .order_by("-position")
                .first()
            )
            redraft = prior.key if prior else ""
        if not redraft:
            raise DecisionForbidden("this step has no drafting step to send back to")
        run_services.run_rewind(step=step, to_step_key=redraft, actor=actor, note=comment)


def _settle_conflicts(step: Step, kind: str, actor: str, resolution: str) -> None:
    now = timezone.now()
    for conflict in ConflictArtifact.objects.filter(step=step, kind=kind, status=ConflictStatus.OPEN):
        settled = ConflictArtifact.objects.filter(pk=conflict.pk, status=ConflictStatus.OPEN).update(
            status=ConflictStatus.RESOLVED,
            resolution=resolution,
            resolved_at=now,
            version=F("version") + 1,
            note="settled by a new approval",
            updated_at=now,
        )
        if settled:
            _audit_conflict(conflict, "conflict_resolved", actor, {"resolution": resolution})


def artifact_edit(*, artifact: Artifact, user: User, expected_version: int, content: Any) -> ArtifactVersion:
    """Write version n+1 of an artifact (compare-and-set on its latest version number).

    Invalidates every earlier approval of the step and opens a new request for the new version.
    Two edits based on the same version: the second raises EditConflict with a
    ``concurrent_edit`` conflict artifact holding both contents. PermissionDenied for a user
    without the operator role in the artifact's tenant.
    """
    access.access_edit_artifact(user, artifact.tenant.slug)
    return _artifact_edit(artifact=artifact, user=user, expected_version=expected_version, content=content)


def _artifact_edit(*, artifact: Artifact, user: User, expected_version: int, content: Any) -> ArtifactVersion:
    """The edit itself; a reviewer applying a lost edit (a resolution) writes through here."""
    with transaction.atomic():
        locked = Artifact.objects.select_for_update().select_related("step__run").get(pk=artifact.pk)
        if locked.step.status in (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED):
            raise EditConflict(locked, None)
        if locked.latest_version != expected_version:
            # Recorded and committed, then refused: the loser's content is kept for a reviewer.
            current = locked.versions.get(number=locked.latest_version)
            lost = record_conflict(
                ConflictKind.CONCURRENT_EDIT,
                step=locked.step,
                target_key=f"artifact:{locked.pk}",
                current={"version": current.number, "author": current.author, "content": current.content},
                proposed={"based_on": expected_version, "author": user.get_username(), "content": content},
            )
        else:
            return _write_version(locked, user, expected_version, content)
    raise EditConflict(locked, lost)


def _write_version(artifact: Artifact, user: User, based_on: int, content: Any) -> ArtifactVersion:
    version = _new_version(artifact, content, author=user.get_username(), source="human", based_on=based_on)
    invalidated = list(
        ApprovalRequest.objects.filter(
            step=artifact.step, status__in=[ApprovalStatus.PENDING, ApprovalStatus.APPROVED]
        ).values_list("pk", flat=True)
    )
    ApprovalRequest.objects.filter(pk__in=invalidated).update(
        status=ApprovalStatus.INVALIDATED, version=F("version") + 1, updated_at=timezone.now()
    )
    _open_request(artifact.step, artifact, version, _spec(artifact.step))
    core_services.event_record(
        tenant=artifact.tenant_id,
        subject=f"run:{artifact.run_id}",
        verb="artifact_edited",
        actor=user.get_username(),
        payload={"artifact": artifact.pk, "version": version.number, "invalidated": invalidated},
    )
    return version


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
    _audit_conflict(conflict, "conflict_opened", "runwarden", {"kind": kind, "error": error[:300]})
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
    ConflictKind.COMPENSATION_FAILED: (
        "Undoing a committed step kept failing, so the run is only partly compensated. Retry the "
        "compensation once the provider works again, or undo it by hand and mark it compensated; "
        "the remaining compensations then go on."
    ),
}

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


def _audit_conflict(conflict: ConflictArtifact, verb: str, actor: str, payload: dict[str, Any]) -> None:
    core_services.event_record(
        tenant=conflict.tenant_id,
        subject=f"conflict:{conflict.pk}",
        verb=verb,
        actor=actor,
        payload={"run_id": conflict.run_id, "target": conflict.target_key, **payload},
    )


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
    with transaction.atomic():
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
        if won == 1:
            current = ConflictArtifact.objects.select_related("step__run", "run", "effect").get(
                pk=conflict.pk
            )
            _apply_resolution(current, resolution, actor, note, external_ref)
            _audit_conflict(current, "conflict_resolved", actor, {"resolution": resolution, "note": note})
    if won != 1:
        raise ResolutionConflict(ConflictArtifact.objects.get(pk=conflict.pk))
    return current


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
    elif resolution == "apply_proposed" and conflict.kind == ConflictKind.ENTITY_VERSION_MISMATCH:
        if step is not None:
            run_services.step_resume(step=step, actor=actor, from_statuses=in_conflict)
    elif (
        resolution == "apply_proposed" and conflict.kind == ConflictKind.CONCURRENT_EDIT and step is not None
    ):
        artifact = Artifact.objects.get(step=step)
        user = User.objects.get(username=actor)
        _artifact_edit(  # the reviewer's resolution, not an operator's edit
            artifact=artifact,
            user=user,
            expected_version=artifact.latest_version,
            content=(conflict.proposed or {}).get("content"),
        )
    elif resolution == "retry_compensation" and step is not None:
        run_services.compensation_retry(step=step, actor=actor)
    elif resolution == "mark_compensated" and step is not None:
        run_services.compensation_mark_done(step=step, actor=actor, note=note)
    elif resolution == "keep_current" and conflict.kind == ConflictKind.STALE_APPROVAL and step is not None:
        # Back to waiting for a decision on the new version (only if the step is still held).
        run_services.step_await_approval(step=step, actor=actor)


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


def approvals_expire(*, now: Any = None) -> int:
    """Apply the timeout fallback of pending requests past their deadline, each exactly once
    (a conditional UPDATE on the version, so a human deciding at the same moment wins or loses
    cleanly). Returns how many fired."""
    now = now or timezone.now()
    fired = 0
    for request in ApprovalRequest.objects.filter(
        status=ApprovalStatus.PENDING, expires_at__lte=now
    ).select_related("step__run"):
        spec = _spec(request.step)
        fallback = spec.approval.on_timeout if spec and spec.approval else "reject"
        with transaction.atomic():
            claim = ApprovalRequest.objects.filter(
                pk=request.pk, version=request.version, status=ApprovalStatus.PENDING
            )
            if fallback == "escalate":
                won = claim.update(escalated=True, expires_at=None, version=F("version") + 1, updated_at=now)
                verb = "approval_escalated"
                if won == 1:
                    request.refresh_from_db()
                    notifications.notify(request, "approval_escalated")
            elif fallback == "auto_approve":
                won = claim.update(
                    status=ApprovalStatus.APPROVED,
                    decided_at=now,
                    comment="auto-approved on timeout",
                    version=F("version") + 1,
                    updated_at=now,
                )
                verb = "approval_auto_approved"
            else:
                won = claim.update(
                    status=ApprovalStatus.EXPIRED,
                    decided_at=now,
                    comment="timed out",
                    version=F("version") + 1,
                    updated_at=now,
                )
                verb = "approval_expired"
            if won != 1:
                continue
            fired += 1
            core_services.event_record(
                tenant=request.tenant_id, subject=f"run:{request.run_id}", verb=verb, actor="timeout",
                payload={"approval_id": request.pk},
            )  # fmt: skip
            if fallback == "auto_approve":
                run_services.step_resume(step=request.step, actor="timeout")
            elif fallback == "reject":
                run_services.step_fail(
                    step=request.step, actor="timeout", reason="approval timed out",
                    from_statuses=(StepStatus.WAITING_APPROVAL,),
                )  # fmt: skip
            metrics.APPROVAL_DECISIONS.labels(outcome=f"timeout_{fallback}").inc()
    return fired
