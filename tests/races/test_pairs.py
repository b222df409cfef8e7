"""Two people act on one object at the same instant: every pair of different actions ends with
no 5xx, one clear outcome, the loser told who won (409/412 with the current state, or 403/404
when its right to act was taken away first), the run where the winner sent it, no effect
twice, and the invariants clean.

Each pair races over HTTP against two real web processes (DEBUG off), many trials, the two
requests released together behind a barrier, in turn with a head start of up to 30 ms for
one side or the other, so both orders and the truly simultaneous case all happen.
Approval timeouts race from a thread calling the maintenance task's service, as beat does.
After each trial the test process runs whatever became ready (dispatch and execute, as a
worker would) and checks where the run ended.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.db import transaction
from django.db.models import Count
from django.test import Client
from django.utils import timezone

from approvals import services as approval_services
from approvals.models import ApprovalRequest, ApprovalStatus, Artifact, ConflictArtifact
from core.models import Event, Membership, TenantQuota
from demo.models import SandboxCall
from runs import transitions
from runs.invariants import check_invariants
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_start
from runs.transitions import UNFINISHED_RUN_STATUSES
from tests.approvals.helpers import pump, pump_until
from tests.concurrency import run_concurrently
from tests.races.conftest import Answer, World

TRIALS = int(os.environ.get("RUNWARDEN_RACE_TRIALS", "6"))
FINISHED = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


@dataclass
class Target:
    """What a trial races on: a run parked at its gated step, its pending approval, and (for
    conflict pairs) an open conflict."""

    run: Run
    approval: ApprovalRequest | None
    conflict: ConflictArtifact | None = None


# --- setting up the object -------------------------------------------------------------------

_contacts = iter(range(1, 10**6))


def parked(world: World) -> Target:
    """A demo.lead_followup run whose send step waits for its approval (version 1 pending)."""
    run = run_start(
        tenant=world.tenant,
        workflow="demo.lead_followup",
        input={"lead_id": 7, "contact_id": next(_contacts) % 50 + 1},
        actor="api-bot",
    ).run
    pump()
    approval = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    return Target(run, approval)


def failed(world: World) -> Target:
    """A run that failed at its gated step (its approval rejected)."""
    target = parked(world)
    approval_services.approval_decide(
        request=target.approval, user=world["op2"].user, decision="reject", expected_version=1
    )
    target.run.refresh_from_db()
    assert target.run.status == RunStatus.FAILED
    return target


def expiring(world: World) -> Target:
    """A parked run whose approval is past its deadline (the timeout fires on the next sweep)."""
    target = parked(world)
    ApprovalRequest.objects.filter(pk=target.approval.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    return target


def edit_conflict(world: World) -> Target:
    """A parked run with an open ``concurrent_edit`` conflict: two edits from version 1, the
    second lost. Version 2's approval is pending."""
    target = parked(world)
    artifact = Artifact.objects.get(step=target.approval.step)
    approval_services.artifact_edit(
        artifact=artifact, user=world["admin"].user, expected_version=1, content={"subject": "kept"}
    )
    with pytest.raises(approval_services.EditConflict) as lost:
        approval_services.artifact_edit(
            artifact=artifact, user=world["op2"].user, expected_version=1, content={"subject": "lost"}
        )
    assert lost.value.conflict is not None
    target.conflict = lost.value.conflict
    target.approval = ApprovalRequest.objects.get(run=target.run, status=ApprovalStatus.PENDING)
    return target


def stale_approval(world: World) -> Target:
    """Approved, then edited while the send was starting: the guard refused the send, so the
    step waits in ``conflict`` (stale_approval) and version 2's approval is pending. (The
    engine's own transition puts it there, as the executor does when its guard fails.)"""
    target = parked(world)
    artifact = Artifact.objects.get(step=target.approval.step)
    approval_services.artifact_edit(
        artifact=artifact, user=world["admin"].user, expected_version=1, content={"subject": "edited"}
    )
    step = Step.objects.get(pk=target.approval.step_id)
    with transaction.atomic():
        assert transitions.step_conflict(
            step=step,
            kind="stale_approval",
            error="the artifact changed after it was approved",
            from_statuses=(StepStatus.WAITING_APPROVAL,),
        )
    target.conflict = ConflictArtifact.objects.get(run=target.run, kind="stale_approval")
    target.approval = ApprovalRequest.objects.get(run=target.run, status=ApprovalStatus.PENDING)
    return target


def compensation_stuck(world: World) -> Target:
    """A failed run whose refund kept failing: its compensation waits in ``conflict``
    (compensation_failed) for a reviewer."""
    run = run_start(
        tenant=world.tenant,
        workflow="test.failing_order",
        input={"refund_always_fails": True},
        actor="api-bot",
    ).run
    pump_until(lambda: Run.objects.get(pk=run.pk).compensation == "failed", rounds=80)
    conflict = ConflictArtifact.objects.get(run=run, kind="compensation_failed", status="open")
    return Target(run, approval=None, conflict=conflict)


# --- the actions -----------------------------------------------------------------------------

Action = Callable[[World, Target], Answer]


def decide(actor: str, decision: str) -> Action:
    def act(world: World, t: Target) -> Answer:
        return world[actor].call(
            "POST", f"/api/v1/approvals/{t.approval.pk}/{decision}", {"comment": actor}, t.approval.version
        )

    act.__name__ = f"{decision}({actor})"
    return act


def edit(actor: str) -> Action:
    def act(world: World, t: Target) -> Answer:
        version = t.approval.artifact_version.number
        return world[actor].call(
            "POST",
            f"/api/v1/approvals/{t.approval.pk}/artifact",
            {"content": {"subject": f"edited by {actor}", "body": "new"}},
            version,
        )

    act.__name__ = "redraft(agent)" if actor == "api-bot" else f"edit({actor})"
    return act


def run_action(actor: str, verb: str) -> Action:
    def act(world: World, t: Target) -> Answer:
        return world[actor].call("POST", f"/api/v1/runs/{t.run.pk}/{verb}", {} if verb == "replay" else None)

    act.__name__ = f"{verb}({actor})"
    return act


def resolve(actor: str, resolution: str) -> Action:
    def act(world: World, t: Target) -> Answer:
        assert t.conflict is not None
        return world[actor].call(
            "POST",
            f"/api/v1/conflicts/{t.conflict.pk}/resolve",
            {"resolution": resolution, "note": actor},
            t.conflict.version,
        )

    act.__name__ = f"resolve:{resolution}({actor})"
    return act


def member(actor: str, verb: str, who: str) -> Action:
    def act(world: World, t: Target) -> Answer:
        path = f"/api/v1/tenants/acme/members/{who}"
        if verb == "remove":
            return world[actor].call("DELETE", path)
        return world[actor].call("PATCH", path, {"role": verb})

    act.__name__ = f"{verb}:{who}({actor})"
    return act


def quota_change(actor: str) -> Action:
    def act(world: World, t: Target) -> Answer:
        # Always a change (an unchanged quota records no event, and there would be no order to check).
        weight = TenantQuota.objects.get(tenant=world.tenant).weight % 9 + 1
        return world[actor].call("PUT", "/api/v1/tenants/acme/quota", {"weight": weight})

    act.__name__ = f"quota({actor})"
    return act


def timeout(world: World, t: Target) -> Answer:
    """The approval-timeout sweep (what beat runs), as an answer: 200 when it fired."""
    fired = approval_services.approvals_expire()
    return Answer(200 if fired else 204, {"fired": fired}, "application/json")


# --- what each pair may end with -------------------------------------------------------------

OK = (200, 201, 204)
Outcome = Callable[[Answer, Answer, Target], None]


def assert_loser_told(loser: Answer) -> None:
    """The loser's answer says what won: a 412 carries the current state, a 409 its reason."""
    if loser.status == 412:
        assert "current" in loser.body["error"]["details"], loser
    assert loser.code, loser


def one_wins(lost: tuple[int, ...] = (412,), code: str = "") -> Outcome:
    """Exactly one succeeded; the other lost with one of ``lost`` (and ``code``, if given)."""

    def outcome(a: Answer, b: Answer, t: Target) -> None:
        assert sorted([a.status in OK, b.status in OK]) == [False, True], (a, b)
        loser = a if a.status not in OK else b
        assert loser.status in lost and (not code or loser.code == code), (a, b)
        assert_loser_told(loser)

    return outcome


def serial_or_refused(a: Answer, b: Answer, t: Target) -> None:
    """Both land, one after the other, or one is refused with 409/412 saying why."""
    assert a.status in OK or b.status in OK, (a, b)
    for answer in (a, b):
        if answer.status not in OK:
            assert answer.status in (409, 412), (a, b)
            assert_loser_told(answer)


def event_id(t: Target, verbs: tuple[str, ...], subject: str = "") -> int:
    """The id of the (first) event of ``verbs`` about the trial's run, or another ``subject``:
    ids come from a sequence taken under the same row locks, so they give the serial order."""
    return Event.objects.filter(subject=subject or f"run:{t.run.pk}", verb__in=verbs).earliest("pk").pk


DECIDED = ("approval_approved", "approval_rejected", "approval_changes_requested", "approval_vote")
EDITED = ("artifact_edited",)
NOT_RETRYABLE = one_wins((409,), "run_not_retryable")


def decision_vs_edit(a: Answer, b: Answer, t: Target) -> None:
    """The edit lands unless a rejection ended the run first (then 409 step_finished); an
    approval that came first is invalidated by it; a decision that came second loses with 412
    and the current state (invalidated)."""
    if a.status == 412:
        assert a.body["error"]["details"]["current"]["status"] == "invalidated", (a, b)
        assert b.status == 201, (a, b)
    else:
        assert a.status == 200, (a, b)
        assert b.status == 201 or (b.status == 409 and b.code == "step_finished"), (a, b)
        if b.status == 201:
            assert event_id(t, DECIDED) < event_id(t, ("artifact_edited",)), "the edit came second"


def decision_vs_cancel(a: Answer, b: Answer, t: Target) -> None:
    """A cancel that comes first withdraws the approval: the decision then loses with 412 and
    the current state (withdrawn). A decision that comes first lands; the cancel after it
    lands too, unless a rejection already ended the run (409 run_finished)."""
    if a.status == 412:
        assert a.body["error"]["details"]["current"]["status"] == "withdrawn", (a, b)
        assert b.status == 200, (a, b)
    else:
        assert a.status == 200, (a, b)
        assert b.status == 200 or (b.status == 409 and b.code == "run_finished"), (a, b)
        if b.status == 200:
            assert event_id(t, DECIDED) < event_id(t, ("cancelled",)), "a decision landed after the cancel"


def edit_vs_cancel(a: Answer, b: Answer, t: Target) -> None:
    """An edit that comes first lands and the cancel after it too; after a cancel the edit
    finds its step finished (409 step_finished)."""
    assert b.status == 200, (a, b)
    if a.status == 201:
        assert event_id(t, ("artifact_edited",)) < event_id(t, ("cancelled",)), (
            "an edit landed after the cancel"
        )
    else:
        assert (a.status, a.code) == (409, "step_finished"), (a, b)


def retry_after_reject(a: Answer, b: Answer, t: Target) -> None:
    """Reject, then retry (both land), or retry first: 409 run_not_retryable (still waiting)."""
    assert a.status == 200, (a, b)
    assert b.status == 200 or (b.status == 409 and b.code == "run_not_retryable"), (a, b)


def decision_vs_timeout(a: Answer, b: Answer, t: Target) -> None:
    """Exactly one decides: the person (then the sweep finds nothing due) or the timeout (then
    the person gets 412)."""
    assert (a.status == 200) != (b.status == 200), (a, b)
    assert a.status in (200, 412) and b.status in (200, 204), (a, b)
    if a.status == 412:
        assert a.body["error"]["details"]["current"]["status"] == "expired", (a, b)


def edit_vs_timeout(a: Answer, b: Answer, t: Target) -> None:
    """The edit invalidates the due request (the sweep then finds nothing), or the timeout
    rejects the run first (then the edit finds its step finished: 409)."""
    assert (a.status == 201) != (b.status == 200), (a, b)
    assert a.status in (201, 409) and b.status in (200, 204), (a, b)


def timeout_vs_cancel(a: Answer, b: Answer, t: Target) -> None:
    """The timeout fails the run first (the cancel then finds it finished: 409), or the cancel
    withdraws the request first (the sweep then finds nothing due)."""
    if a.status == 200:
        assert (b.status, b.code) == (409, "run_finished"), (a, b)
    else:
        assert (a.status, b.status) == (204, 200), (a, b)


def acted_before_losing_the_role(act_verbs: tuple[str, ...], subject: str = "") -> Outcome:
    """The role change (or removal) always lands; the act either landed before it — its event
    comes first — or is refused (403, or 404 once the member cannot see the tenant at all)."""

    def outcome(a: Answer, b: Answer, t: Target) -> None:
        assert b.status in (200, 204), (a, b)
        assert a.status in (200, 201, 403, 404), (a, b)
        if a.status in OK:
            changed = Event.objects.filter(verb__in=("membership_role_changed", "membership_revoked"))
            assert event_id(t, act_verbs, subject) < changed.latest("pk").pk, "it acted after losing the role"

    return outcome


def last_admin(a: Answer, b: Answer, t: Target) -> None:
    """Two admins demote each other: one lands, the other is refused — the tenant keeps an
    admin (409 last_admin, or 403 because the loser is no longer an admin)."""
    one_wins(lost=(403, 409))(a, b, t)


@dataclass(frozen=True)
class Pair:
    setup: Callable[[World], Target]
    a: Action
    b: Action
    outcome: Outcome

    @property
    def name(self) -> str:
        return f"{self.a.__name__} vs {self.b.__name__}"


PAIRS = [
    # On a pending approval.
    Pair(parked, decide("op1", "approve"), edit("admin"), decision_vs_edit),
    Pair(parked, decide("op1", "reject"), edit("admin"), decision_vs_edit),
    Pair(parked, decide("op1", "request_changes"), edit("admin"), decision_vs_edit),
    Pair(parked, decide("op1", "approve"), edit("api-bot"), decision_vs_edit),
    Pair(parked, decide("op1", "approve"), decide("op2", "reject"), one_wins()),
    Pair(parked, decide("op1", "approve"), decide("op2", "request_changes"), one_wins()),
    Pair(parked, edit("admin"), edit("api-bot"), one_wins()),
    Pair(parked, decide("op1", "approve"), run_action("op2", "cancel"), decision_vs_cancel),
    Pair(parked, decide("op1", "reject"), run_action("op2", "cancel"), decision_vs_cancel),
    Pair(parked, decide("op1", "request_changes"), run_action("op2", "cancel"), decision_vs_cancel),
    Pair(parked, edit("admin"), run_action("op2", "cancel"), edit_vs_cancel),
    Pair(parked, edit("api-bot"), run_action("op2", "cancel"), edit_vs_cancel),
    Pair(parked, decide("op1", "approve"), run_action("op2", "replay"), serial_or_refused),
    Pair(parked, decide("op1", "reject"), run_action("op2", "retry"), retry_after_reject),
    Pair(expiring, decide("op1", "approve"), timeout, decision_vs_timeout),
    Pair(expiring, edit("admin"), timeout, edit_vs_timeout),
    Pair(expiring, timeout, run_action("op2", "cancel"), timeout_vs_cancel),
    # On a failed run.
    Pair(failed, run_action("op1", "retry"), run_action("op2", "cancel"), serial_or_refused),
    Pair(
        failed, run_action("op1", "retry"), run_action("op2", "retry"), one_wins((409,), "run_not_retryable")
    ),
    # On an open conflict.
    Pair(edit_conflict, resolve("rev1", "keep_current"), resolve("rev2", "apply_proposed"), one_wins()),
    Pair(edit_conflict, resolve("rev1", "apply_proposed"), decide("op1", "approve"), serial_or_refused),
    Pair(edit_conflict, resolve("rev1", "apply_proposed"), run_action("op1", "cancel"), serial_or_refused),
    Pair(stale_approval, resolve("rev1", "keep_current"), decide("op1", "approve"), serial_or_refused),
    Pair(stale_approval, resolve("rev1", "cancel_run"), decide("op1", "approve"), one_wins()),
    Pair(
        compensation_stuck,
        resolve("rev1", "retry_compensation"),
        resolve("rev2", "mark_compensated"),
        one_wins(),
    ),
    Pair(
        compensation_stuck,
        resolve("rev1", "mark_compensated"),
        run_action("op1", "cancel"),
        one_wins((409,), "run_finished"),
    ),
    # A member's right to act, changed while they act.
    Pair(
        parked,
        decide("op1", "approve"),
        member("admin", "reviewer", "op1"),
        acted_before_losing_the_role(DECIDED),
    ),
    Pair(
        parked,
        decide("op1", "approve"),
        member("admin", "remove", "op1"),
        acted_before_losing_the_role(DECIDED),
    ),
    Pair(
        parked,
        edit("op2"),
        member("admin", "remove", "op2"),
        acted_before_losing_the_role(("artifact_edited",)),
    ),
    Pair(
        parked,
        run_action("op1", "cancel"),
        member("admin", "remove", "op1"),
        acted_before_losing_the_role(("cancelled",)),
    ),
    Pair(
        parked,
        quota_change("admin"),
        member("admin2", "operator", "admin"),
        acted_before_losing_the_role(("quota_updated",), subject="tenant:acme"),
    ),
    Pair(parked, member("admin", "operator", "admin2"), member("admin2", "operator", "admin"), last_admin),
]


# --- the checks after every trial ------------------------------------------------------------


def assert_clear_answer(answer: Answer) -> None:
    """Never a 5xx; an error always in the API's JSON shape."""
    assert answer.status < 500, answer
    if answer.status >= 400:
        assert answer.content_type.startswith("application/json"), answer
        assert set(answer.body["error"]) >= {"code", "message"}, answer


def assert_run_settled(target: Target) -> None:
    """After the winner's action ran its course: the run rests where a serial order of the
    two actions sends it, the approved version (and only that) was sent, never twice."""
    run = Run.objects.get(pk=target.run.pk)
    sends = SandboxCall.objects.filter(connector="messaging", idempotency_key__startswith=f"{run.pk}:")
    assert not sends.values("idempotency_key").annotate(n=Count("id")).filter(n__gt=1).exists()
    if run.status == RunStatus.SUCCEEDED:
        [sent] = sends
        approved = ApprovalRequest.objects.filter(run=run, status=ApprovalStatus.APPROVED).latest("pk")
        assert approved.artifact_version.number == approved.artifact.latest_version
        assert sent.request["subject"] == approved.artifact_version.content["subject"]
    else:
        assert not sends.exists(), run.status
        waiting = ApprovalRequest.objects.filter(run=run, status=ApprovalStatus.PENDING).count()
        if run.status == RunStatus.WAITING_APPROVAL:
            assert waiting == 1, "a waiting run has exactly one pending approval"
        elif run.status in FINISHED:
            assert waiting == 0, f"a {run.status} run still has a pending approval"


@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: pair.name)
def test_two_actions_on_one_object_end_with_one_outcome_and_a_clear_answer(world: World, pair: Pair) -> None:
    rng = random.Random(pair.name)
    actions = [pair.a, pair.b]
    seen: Counter[str] = Counter()  # what the two got, trial by trial
    for trial in range(TRIALS):
        target = pair.setup(world)
        # Released together; then each in turn given a head start of up to 30 ms, so both
        # orders, and the truly simultaneous case, all happen.
        head_start = rng.random() * 0.03
        delays = [(0.0, 0.0), (head_start, 0.0), (0.0, head_start)][trial % 3]

        def race(i: int, target: Target = target, delays: tuple[float, float] = delays) -> Answer:
            time.sleep(delays[i])  # either may land first
            return actions[i](world, target)

        a, b = run_concurrently(race, 2)
        for answer in (a, b):
            if isinstance(answer, BaseException):
                raise answer
            assert_clear_answer(answer)
        pair.outcome(a, b, target)
        seen[f"{a.status} {a.code or 'ok'} / {b.status} {b.code or 'ok'}"] += 1
        pump()
        assert_run_settled(target)
        assert check_invariants() == [], f"trial {trial}"
        _restore_members(world)
    report(pair.name, seen)


def report(name: str, seen: Counter[str]) -> None:
    """With RUNWARDEN_RACE_REPORT set, append what each pair's two actors got (a JSON line)."""
    path = os.environ.get("RUNWARDEN_RACE_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"pair": name, "answers": dict(seen)}) + "\n")


def _restore_members(world: World) -> None:
    """Give back the roles a pair took away, for the next trial."""
    roles = {"op1": "operator", "op2": "operator", "admin": "admin", "admin2": "admin"}
    for name, role in roles.items():
        Membership.objects.update_or_create(
            user=world[name].user, tenant=world.tenant, defaults={"role": role}
        )


def test_a_quota_change_racing_admissions_applies_in_one_order(world: World) -> None:
    """An admin lowers the queue depth to what is already queued while two operators start
    runs. The quota row orders them: every run accepted was admitted before the change (its
    event comes first), every start after it is refused with 429 — never a run admitted past a
    cap already in force."""
    body = {"workflow": "demo.lead_followup", "input": {"lead_id": 7, "contact_id": 3}}
    seen: Counter[str] = Counter()
    for trial in range(TRIALS):
        if trial == 0:  # something queued, so the cap can fall to it
            run_start(tenant=world.tenant, workflow=body["workflow"], input=body["input"], actor="api-bot")
        queued = Run.objects.filter(tenant=world.tenant, status__in=UNFINISHED_RUN_STATUSES).count()
        TenantQuota.objects.filter(tenant=world.tenant).update(max_queue_depth=queued + 2)
        calls = [
            ("admin", "PUT", "/api/v1/tenants/acme/quota", {"max_queue_depth": queued}),
            ("op1", "POST", "/api/v1/runs", body),
            ("op2", "POST", "/api/v1/runs", body),
        ]
        answers = run_concurrently(lambda i, calls=calls: world[calls[i][0]].call(*calls[i][1:]), 3)
        for answer in answers:
            assert isinstance(answer, Answer), answer
            assert_clear_answer(answer)
        change, *starts = answers
        assert change.status == 200, change
        assert all(start.status in (201, 429) for start in starts), starts
        seen[" / ".join(f"{answer.status} {answer.code or 'ok'}" for answer in answers)] += 1
        changed_at = Event.objects.filter(tenant=world.tenant, verb="quota_updated").latest("pk").pk
        for start in starts:
            if start.status == 201:
                created = Event.objects.get(subject=f"run:{start.body['id']}", verb="created")
                assert created.pk < changed_at, f"trial {trial}: a run was admitted after the cap fell"
        assert check_invariants() == [], f"trial {trial}"
    report("quota(admin) vs start(op1) vs start(op2)", seen)


def test_in_the_console_a_decision_racing_an_edit_gets_a_clear_notice_and_the_fresh_card(
    world: World,
) -> None:
    """The console's own forms (htmx, session login), an operator approving while an admin
    saves an edit: never a 500; the loser's answer is the card as it is now with a notice
    saying what happened."""
    operator, admin = Client(), Client()
    seen: Counter[str] = Counter()
    operator.force_login(world["op1"].user)
    admin.force_login(world["admin"].user)
    for trial in range(TRIALS):
        target = parked(world)
        posts = [
            (operator, "decide", {"decision": "approve", "expected_version": target.approval.version}),
            (admin, "edit", {"expected_version": 1, "field:subject": "edited", "field:body": "new"}),
        ]
        approve, edit = run_concurrently(
            lambda i, posts=posts, pk=target.approval.pk: posts[i][0].post(
                f"/approvals/{pk}/{posts[i][1]}/", posts[i][2], HTTP_HX_REQUEST="true"
            ),
            2,
        )
        assert edit.status_code == 200, f"trial {trial}: {edit.status_code}"
        if approve.status_code == 409:  # the edit came first
            assert "Already invalidated by an edit" in approve.content.decode(), approve.content[:500]
        else:
            assert approve.status_code == 200, f"trial {trial}: {approve.status_code}"
        assert "Saved version 2" in edit.content.decode()
        seen[f"{approve.status_code} / {edit.status_code}"] += 1
        pump()
        assert_run_settled(target)
        assert check_invariants() == [], f"trial {trial}"
    report("console: approve(op1) vs edit(admin)", seen)
