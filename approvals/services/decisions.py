"""Decisions on approval requests, by people and by timeouts.

Every decision is a compare-and-set on ``ApprovalRequest.version`` (one conditional UPDATE):
of two tabs, two operators, or a timeout racing a human, exactly one wins and the step
resumes exactly once; the loser changes nothing and gets the current state back."""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from approvals import notifications
from approvals.models import (
    ApprovalRequest,
    ApprovalStatus,
    ApprovalVote,
    ConflictKind,
)
from approvals.services.conflicts import settle_conflicts
from approvals.services.gate import artifact_policy, spec_of
from approvals.workflows import OUTSIDE_APPROVAL
from core import metrics, rawsql, tracing
from core import services as core_services
from core.access import member_role_check
from core.models import Role, User
from core.transactions import transaction_retried_once
from runs import services as run_services
from runs.locking import run_steps_lock, run_steps_locked_statuses
from runs.models import Step, StepStatus


class DecisionConflict(Exception):
    """The caller's version is stale or the request is no longer pending: nothing changed."""

    def __init__(self, current: ApprovalRequest) -> None:
        super().__init__(f"approval {current.pk} is {current.status} at version {current.version}")
        self.current = current


class DecisionForbidden(Exception):
    """The user may not decide this request (role, self-approval, already voted)."""


def _can_decide(user: User, request: ApprovalRequest) -> None:
    """The decider's role fits the request, read in the deciding transaction with the member's
    row locked (``core.access``), so a role change racing the decision is seen."""
    roles = [Role.ADMIN] if request.escalated else (request.eligible_roles or [Role.OPERATOR])
    try:
        member_role_check(user, request.tenant_id, roles, "this approval")
    except PermissionDenied as refused:
        raise DecisionForbidden(str(refused)) from None


def _blocks_self_approval(user: User, request: ApprovalRequest) -> bool:
    policy = artifact_policy(request.artifact)
    if policy and policy.allow_self_approval:
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
    now = timezone.now()

    def decide() -> ApprovalRequest | None:
        statuses = run_steps_locked_statuses(request.run_id)  # the anchor: see runs/locking.py
        # The row at the caller's version: what was read for the request, unless it was read at
        # another version (then again, now). Every change of the row moves its version on.
        seen = request if request.version == expected_version else _reread(request)
        # Refused before anything is written, on the role as it stands (403 before 412).
        _can_decide(user, seen)
        if decision == "approve" and _blocks_self_approval(user, seen):
            raise DecisionForbidden(
                "you started this run or wrote this version: someone else must approve it"
            )
        if seen.version != expected_version or seen.status != ApprovalStatus.PENDING:
            return None
        decided = _decided(seen, user, decision, comment, now)
        written, voted = _decision_written(decided, expected_version, decision)
        if not written:
            return None
        if not voted:
            # Raised out of the transaction, which then undoes the compare-and-set too.
            raise DecisionForbidden("you already approved this request; it needs another approver")
        decided.step.status = statuses.get(decided.step_id, decided.step.status)  # under the lock
        _after_decision(decided, user.get_username(), decision, comment)
        return decided

    current = transaction_retried_once(decide)
    if current is None:
        # Lost the compare-and-set: nothing was written; show who won, when, on which version.
        raise DecisionConflict(
            ApprovalRequest.objects.select_related("decided_by", "artifact_version").get(pk=request.pk)
        )
    metrics.APPROVAL_DECISIONS.labels(
        outcome=decision if current.status != ApprovalStatus.PENDING else "vote"
    ).inc()
    return current


# What a decision writes on the request.
DECISION_FIELDS = ("status", "approvals", "version", "decided_by", "decided_at", "comment", "updated_at")


def _decision_written(decided: ApprovalRequest, expected_version: int, decision: str) -> tuple[bool, bool]:
    """Write the decision's fields (``DECISION_FIELDS``) on the request, as a compare-and-set:
    only while it is still pending at ``expected_version``; an approval's vote; and the
    decision's event. Whether the decision was written, and whether the vote was (True but for
    an approver who had voted already: the unique constraint decides, without a savepoint).
    On PostgreSQL one statement (prepared where the thread prepares): every decision writes it."""
    fields = [field for field in ApprovalRequest._meta.concrete_fields if field.name in DECISION_FIELDS]
    values = [field.get_db_prep_save(getattr(decided, field.attname), connection) for field in fields]
    update = (
        f"UPDATE {ApprovalRequest._meta.db_table} SET {', '.join(f'{f.column} = %s' for f in fields)}"
        f" WHERE id = %s AND version = %s AND status = '{ApprovalStatus.PENDING.value}'"
    )
    update_params = [*values, decided.pk, expected_version]
    votes = decision == "approve"
    verb, event = _decision_event(decided)
    if not rawsql.on_postgresql():  # SQLite runs one statement per call
        with connection.cursor() as cursor:
            cursor.execute(update, update_params)
            if cursor.rowcount != 1:
                return False, False
        if votes and not _vote_recorded(decided):
            return True, False
        core_services.event_record(verb=verb, **event)
        return True, True
    sql, event_params, built = core_services.event_insert_select_sql(
        verb_sql=rawsql.sql_strings(verb), **event
    )
    vote_params = [*_vote_of(decided), votes]
    with connection.cursor() as cursor:
        rawsql.execute_prepared(
            cursor,
            _DECISION_SQL.format(update=update, event=sql),
            [*update_params, *vote_params, *event_params, votes],
        )
        written, voted, event_id = cursor.fetchone()
    if not written:
        return False, False
    if votes and not voted:
        return True, False
    recorded = built(event_id, verb)
    transaction.on_commit(lambda: core_services.event_committed(recorded))
    return True, True


def _vote_of(decided: ApprovalRequest) -> list[Any]:
    """The decider's vote on the request: who, and when (the decision's own moment)."""
    assert decided.decided_by is not None and decided.decided_at is not None
    return [decided.decided_by.pk, rawsql.adapt_datetime(decided.decided_at)]


# An approver's vote: nothing where they voted already (the unique constraint decides).
_VOTE_INSERT = f"INSERT INTO {ApprovalVote._meta.db_table} (request_id, user_id, created_at)"
_VOTE_ONCE = " ON CONFLICT (request_id, user_id) DO NOTHING RETURNING id"

# ``_decision_written`` on PostgreSQL: the compare-and-set, then, only where it won, an
# approval's vote, and the decision's event unless the approver had voted already.
_DECISION_SQL = (
    "WITH decided AS ({update} RETURNING id),"
    f" vote AS ({_VOTE_INSERT} SELECT id, %s, %s FROM decided WHERE CAST(%s AS boolean){_VOTE_ONCE}),"
    " event AS ({event} WHERE EXISTS (SELECT 1 FROM decided)"
    " AND (NOT CAST(%s AS boolean) OR EXISTS (SELECT 1 FROM vote)) RETURNING id)"
    " SELECT (SELECT count(*) FROM decided), (SELECT count(*) FROM vote), (SELECT id FROM event)"
)


def _decision_event(request: ApprovalRequest) -> tuple[str, dict[str, Any]]:
    """The verb of the event a decision leaves on its run, and the rest of it."""
    verb = f"approval_{request.status}" if request.status != ApprovalStatus.PENDING else "approval_vote"
    payload = {
        "approval_id": request.pk,
        "version": request.version,
        "artifact_version": request.artifact_version.number,
        "approvals": request.approvals,
        "required": request.required,
        "comment": request.comment,
    }
    assert request.decided_by is not None
    where = {"tenant": request.tenant_id, "subject": f"run:{request.run_id}"}
    return verb, {**where, "actor": request.decided_by.get_username(), "payload": payload}


def _reread(request: ApprovalRequest) -> ApprovalRequest:
    """The request's changeable fields read again (a copy: the caller's is kept for a retry)."""
    fresh = copy.copy(request)
    fresh.refresh_from_db(fields=[*DECISION_FIELDS, "required", "escalated", "eligible_roles", "expires_at"])
    return fresh


def _decided(seen: ApprovalRequest, user: User, decision: str, comment: str, now: Any) -> ApprovalRequest:
    """The request as this decision leaves it, from the row as it stood (``seen``): a copy, with
    its step and run read for the request; the caller's object is kept as it was for a retry."""
    decided = copy.copy(seen)
    decided.step = copy.copy(seen.step)
    decided.step.run = seen.run
    decided.run, decided.decided_by = seen.run, user
    decided.version, decided.decided_at, decided.comment, decided.updated_at = (
        seen.version + 1,
        now,
        comment,
        now,
    )
    if decision == "approve":
        decided.approvals = seen.approvals + 1
        # The quorum is reached when the approvals counted so far, this one too, cover it.
        if decided.approvals >= seen.required:
            decided.status = ApprovalStatus.APPROVED
    else:
        decided.status = ApprovalStatus.REJECTED if decision == "reject" else ApprovalStatus.CHANGES_REQUESTED
    return decided


def _vote_recorded(request: ApprovalRequest) -> bool:
    """Record the decider's vote on the request (SQLite: on PostgreSQL ``_DECISION_SQL`` does);
    False if they had voted already (the statement does nothing rather than fail)."""
    with connection.cursor() as cursor:
        cursor.execute(f"{_VOTE_INSERT} VALUES (%s, %s, %s){_VOTE_ONCE}", [request.pk, *_vote_of(request)])
        return cursor.fetchone() is not None


def _after_decision(request: ApprovalRequest, actor: str, decision: str, comment: str) -> None:
    step = request.step
    approval_traced(request, decision if request.status != ApprovalStatus.PENDING else "vote", actor)
    if request.status != ApprovalStatus.PENDING and step.run.workflow == OUTSIDE_APPROVAL:
        notifications.notify(request, "approval_decided")  # the outside agent's webhook
    if request.status == ApprovalStatus.APPROVED:
        # Resumes a waiting step; also a step held in conflict because an edit made its
        # earlier approval stale — approving the new version settles that conflict.
        held_in_conflict = step.status == StepStatus.CONFLICT  # read under the run's lock
        resumed = run_services.step_resume(
            step=step, actor=actor, from_statuses=(StepStatus.WAITING_APPROVAL, StepStatus.CONFLICT)
        )
        if resumed and held_in_conflict:
            settle_conflicts(step, ConflictKind.STALE_APPROVAL, actor, "approved_new_version")
    elif request.status == ApprovalStatus.REJECTED and request.artifact.call_key:
        # A governed call's rejection is the body's to handle (``Rejected``): the step runs on.
        run_services.step_resume(step=step, actor=actor)
    elif request.status == ApprovalStatus.REJECTED:
        run_services.step_fail(
            step=step,
            actor=actor,
            reason=f"rejected by {actor}: {comment}".strip(": "),
            from_statuses=(StepStatus.WAITING_APPROVAL,),
        )
    elif request.status == ApprovalStatus.CHANGES_REQUESTED:
        if request.artifact.call_key:
            raise DecisionForbidden(
                "a tool call is approved as proposed, edited, or rejected: edit its request instead"
            )
        spec = spec_of(step)
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


def approval_traced(request: ApprovalRequest, outcome: str, actor: str, decided_at: Any = None) -> None:
    """The span of the wait for this approval, from requested to decided, in its run's trace,
    linked to the span that decided it (the decision's request, or the timeout's task);
    recorded when the deciding transaction commits."""
    if not tracing.enabled():
        return
    run, end = request.step.run, decided_at or request.decided_at or timezone.now()
    attributes = {
        "runwarden.run_id": run.pk,
        "runwarden.step_key": request.step.key,
        "runwarden.approval_id": request.pk,
        "runwarden.approval.outcome": outcome,
        "runwarden.approval.decided_by": actor,
        "runwarden.approval.version": request.version,
    }
    transaction.on_commit(
        lambda: tracing.span_recorded(
            run.traceparent,
            f"approval {request.step.key}",
            start=request.created_at,
            end=end,
            attributes=attributes,
            link_current=True,
        )
    )


def approvals_expire(*, now: Any = None) -> int:
    """Apply the timeout fallback of pending requests past their deadline, each exactly once
    (a conditional UPDATE on the version, so a human deciding at the same moment wins or loses
    cleanly). Returns how many fired."""
    now = now or timezone.now()
    fired = 0
    for request in ApprovalRequest.objects.filter(
        status=ApprovalStatus.PENDING, expires_at__lte=now
    ).select_related("step__run", "artifact"):
        policy = artifact_policy(request.artifact)
        fallback = policy.on_timeout if policy else "reject"
        if transaction_retried_once(partial(_expire, request, fallback, now)):
            fired += 1
            metrics.APPROVAL_DECISIONS.labels(outcome=f"timeout_{fallback}").inc()
    return fired


def _expire(request: ApprovalRequest, fallback: str, now: Any) -> bool:
    """One request's timeout fallback, in the caller's transaction; whether it fired."""
    run_steps_lock(request.run_id)  # the anchor: see runs/locking.py
    claim = ApprovalRequest.objects.filter(
        pk=request.pk, version=request.version, status=ApprovalStatus.PENDING
    )
    if fallback == "escalate":
        won = claim.update(escalated=True, expires_at=None, version=F("version") + 1, updated_at=now)
        verb = "approval_escalated"
        if won == 1:  # read afresh: ``request`` is the caller's, kept as it was for a retry
            notifications.notify(ApprovalRequest.objects.get(pk=request.pk), "approval_escalated")
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
        return False
    approval_traced(request, verb.removeprefix("approval_"), "timeout", decided_at=now)
    if fallback != "escalate" and request.step.run.workflow == OUTSIDE_APPROVAL:
        notifications.notify(ApprovalRequest.objects.get(pk=request.pk), "approval_decided")
    core_services.event_record(
        tenant=request.tenant_id, subject=f"run:{request.run_id}", verb=verb, actor="timeout",
        payload={"approval_id": request.pk},
    )  # fmt: skip
    if fallback == "auto_approve" or (fallback == "reject" and request.artifact.call_key):
        # (A governed call's timeout is the body's to handle, as a rejection: ``Rejected``.)
        run_services.step_resume(step=request.step, actor="timeout")
    elif fallback == "reject":
        run_services.step_fail(
            step=request.step, actor="timeout", reason="approval timed out",
            from_statuses=(StepStatus.WAITING_APPROVAL,),
        )  # fmt: skip
    return True
