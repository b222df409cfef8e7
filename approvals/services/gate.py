"""The gate the executor asks before a step's effect: it keeps the step's artifact, writes its
versions and opens an approval request for each version that needs a decision. The executor
asks again in the transaction that proposes the effect (``guard_effect``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import connection
from django.db.models import F
from django.utils import timezone

from approvals import notifications
from approvals.models import (
    ApprovalRequest,
    ApprovalStatus,
    Artifact,
    ArtifactVersion,
    ConflictKind,
)
from approvals.services.conflicts import settle_run_conflicts
from core import rawsql
from core import services as core_services
from core.models import Role, User
from runs.definitions import ApprovalPolicy, StepSpec, UnknownWorkflow, get_workflow
from runs.gates import ApprovalNoLongerValid, GateVerdict
from runs.models import Run, Step

# Conflicts about a run's drafts: a cancelled run leaves nothing to keep or apply.
DRAFT_CONFLICT_KINDS = (ConflictKind.STALE_APPROVAL, ConflictKind.CONCURRENT_EDIT)


def spec_of(step: Step, run: Run | None = None) -> StepSpec | None:
    """The step's declaration; ``run``: the step's run when it is in hand (no query for it)."""
    run = run or step.run
    try:
        return get_workflow(run.workflow, run.workflow_version).spec(step.key)
    except UnknownWorkflow:
        return None


def artifact_policy(artifact: Artifact) -> ApprovalPolicy | None:
    """How an artifact's versions are approved: its governed call's own policy, or its gated
    step's (None when the workflow is no longer registered: the defaults)."""
    if artifact.call_key:
        return ApprovalPolicy(
            **{**artifact.call_policy, "roles": tuple(artifact.call_policy.get("roles", ()))}
        )
    spec = spec_of(artifact.step)
    return spec.approval if spec else None


def policy_record(policy: ApprovalPolicy) -> dict[str, Any]:
    """A call's policy as the artifact keeps it (its timeout's fallback is read back from it)."""
    return {
        "required": policy.required,
        "roles": list(policy.roles),
        "allow_self_approval": policy.allow_self_approval,
        "timeout_seconds": policy.timeout_seconds,
        "on_timeout": policy.on_timeout,
    }


def open_request(
    step: Step, artifact: Artifact, version: ArtifactVersion, policy: ApprovalPolicy | None
) -> ApprovalRequest:
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


def new_version(
    artifact: Artifact, content: Any, author: str, source: str, based_on: int | None
) -> ArtifactVersion:
    number = (artifact.versions.order_by("-number").values_list("number", flat=True).first() or 0) + 1
    Artifact.objects.filter(pk=artifact.pk).update(latest_version=number, updated_at=timezone.now())
    artifact.latest_version = number
    return ArtifactVersion.objects.create(
        artifact=artifact, number=number, content=content, author=author, source=source, based_on=based_on
    )


class _Locked:
    """A step's artifact, row-locked, with its latest version and one of its requests."""

    def __init__(self, artifact: Artifact, latest: ArtifactVersion | None, request: ApprovalRequest | None):
        self.artifact = artifact
        self.latest = latest
        self.request = request


def _artifact_locked(
    step: Step, call_key: str, approval_id: int | None = None, *, lock: bool = True
) -> _Locked | None:
    """The artifact of ``step`` (of its governed call ``call_key``; "" for the step's own),
    row-locked unless ``lock`` is False; its latest version; and the request ``approval_id``,
    else its newest — in one statement. Asked as every gated step starts and every approved
    effect is proposed. (A statement that waited for the lock reads the joined rows as they
    were before the wait: lock first, then read, where an edit may be in flight.)"""
    sql = (
        f"SELECT {rawsql.select_list(Artifact, 'a')}, {rawsql.select_list(ArtifactVersion, 'v')},"
        f" {rawsql.select_list(ApprovalRequest, 'r')}"
        f" FROM {Artifact._meta.db_table} a"
        f" LEFT JOIN {ArtifactVersion._meta.db_table} v"
        " ON v.artifact_id = a.id AND v.number = a.latest_version"
        f" LEFT JOIN {ApprovalRequest._meta.db_table} r ON r.id = COALESCE(CAST(%s AS bigint),"
        f" (SELECT MAX(n.id) FROM {ApprovalRequest._meta.db_table} n WHERE n.artifact_id = a.id))"
        " WHERE a.step_id = %s AND a.call_key = %s"
    )
    if lock and rawsql.on_postgresql():
        sql += " FOR UPDATE OF a"  # as select_for_update (SQLite lets one writer in at a time)
    with connection.cursor() as cursor:
        rawsql.execute_prepared(cursor, sql, [approval_id, step.pk, call_key])  # a worker plans it once
        row = cursor.fetchone()
    if row is None:
        return None
    version_at = rawsql.width(Artifact)
    request_at = version_at + rawsql.width(ArtifactVersion)
    artifact = rawsql.from_row(Artifact, row)
    latest = rawsql.from_row(ArtifactVersion, row, version_at) if row[version_at] is not None else None
    request = rawsql.from_row(ApprovalRequest, row, request_at) if row[request_at] is not None else None
    return _Locked(artifact, latest, request)


class ApprovalGate:
    """The approvals app's implementation of runs.gates.ApprovalGate."""

    def check(self, *, run: Run, step: Step, spec: StepSpec, draft: Any) -> GateVerdict:
        found = _artifact_locked(step, "")
        if found is None:
            artifact = Artifact.objects.create(
                tenant_id=step.tenant_id, run=run, step=step, kind=spec.tool or spec.lane, latest_version=0
            )
            version = new_version(artifact, draft, author=run.actor, source="agent", based_on=None)
            request = open_request(step, artifact, version, spec.approval)
            core_services.event_record(
                tenant=step.tenant_id,
                subject=f"run:{run.id}",
                verb="approval_requested",
                actor="executor",
                payload={"step": step.key, "approval_id": request.pk, "artifact_version": version.number},
            )
            return GateVerdict("waiting", approval_id=request.pk)
        return _verdict(run, step, found, draft, spec.approval)

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
        found = _artifact_locked(step, call_key)
        if found is None:
            artifact = Artifact.objects.create(
                tenant_id=step.tenant_id,
                run=run,
                step=step,
                call_key=call_key,
                call_policy=policy_record(policy),
                kind=tool[:50],
                latest_version=0,
            )
            version = new_version(artifact, request, author=run.actor, source="agent", based_on=None)
            approval = open_request(step, artifact, version, policy)
            core_services.event_record(
                tenant=step.tenant_id,
                subject=f"run:{run.id}",
                verb="approval_requested",
                actor="executor",
                payload={
                    "step": step.key,
                    "call": call_key,
                    "tool": tool,
                    "approval_id": approval.pk,
                    "artifact_version": version.number,
                },
            )
            return GateVerdict("waiting", approval_id=approval.pk)
        return _verdict(run, step, found, request, policy)

    def withdraw(self, *, run_id: str, actor: str, reason: str) -> None:
        """In the cancel's transaction (which holds the run's anchor): pending requests become
        ``withdrawn`` (version bumped, so a decision racing the cancel loses its compare-and-set
        with 412), and open conflicts about the run's drafts are settled — there is nothing
        left to keep or apply. Conflicts about effects stay open: a compensation waits on them."""
        now = timezone.now()
        withdrawn = list(
            ApprovalRequest.objects.filter(run_id=run_id, status=ApprovalStatus.PENDING).values_list(
                "pk", "tenant_id"
            )
        )
        ApprovalRequest.objects.filter(pk__in=[pk for pk, _ in withdrawn]).update(
            status=ApprovalStatus.WITHDRAWN,
            version=F("version") + 1,
            decided_by=User.objects.filter(username=actor).first(),  # who cancelled, when a person did
            decided_at=now,
            comment=reason[:2000],
            updated_at=now,
        )
        for approval_id, tenant_id in withdrawn:
            core_services.event_record(
                tenant=tenant_id,
                subject=f"run:{run_id}",
                verb="approval_withdrawn",
                actor=actor,
                payload={"approval_id": approval_id, "reason": reason[:500]},
            )
        settle_run_conflicts(run_id, DRAFT_CONFLICT_KINDS, actor, "run_cancelled", note=reason)

    def guard_effect(self, *, step: Step, verdict: GateVerdict) -> None:
        _guard(step, "", verdict)

    def guard_call(self, *, step: Step, call_key: str, verdict: GateVerdict) -> None:
        _guard(step, call_key, verdict)


def _verdict(run: Run, step: Step, found: _Locked, draft: Any, policy: ApprovalPolicy | None) -> GateVerdict:
    """The verdict on an artifact that exists (with its latest version and newest request):
    approved (its latest version), waiting, or rejected; a new request for the latest version
    when the last one no longer stands."""
    artifact, latest, request = found.artifact, found.latest, found.request
    assert latest is not None and request is not None  # an artifact is made with both
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
        latest = new_version(artifact, draft, author=run.actor, source="agent", based_on=latest.number)
    request = open_request(step, artifact, latest, policy)
    return GateVerdict("waiting", approval_id=request.pk)


def _guard(step: Step, call_key: str, verdict: GateVerdict) -> None:
    # Locks the artifact row: an edit either committed before (then we refuse) or waits
    # until this proposal commits (then the approved version is what is sent). Locked first,
    # read after: an edit that committed while this waited is what the read below sees.
    Artifact.objects.select_for_update().filter(step=step, call_key=call_key).values_list("pk").first()
    found = _artifact_locked(step, call_key, verdict.approval_id, lock=False)
    if found is None:
        raise Artifact.DoesNotExist(f"step {step.pk} has no artifact for {call_key!r}")
    artifact = found.artifact
    request = found.request if verdict.approval_id is not None else None
    latest_id = found.latest.pk if found.latest is not None else None
    if (
        request is None
        or request.status != ApprovalStatus.APPROVED
        or verdict.artifact_version_id != latest_id
    ):
        what = f"the {artifact.kind} call {call_key}" if call_key else "step " + step.key
        raise ApprovalNoLongerValid(
            f"the approval of {what} no longer holds: the artifact is at version "
            f"{artifact.latest_version} and the approval is {request.status if request else 'gone'}",
            approval_id=verdict.approval_id,
        )
