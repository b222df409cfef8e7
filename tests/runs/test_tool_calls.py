"""Governed tool calls (``ctx.tool``): an agent's calls decided at runtime inside one step run
through the ledger with stable keys (a re-run is answered from the record), hold their entity
locks for the call, count against the tool's caps beside admitted steps, and may ask a human
mid-step: the step parks, and on approval runs again from its start with the approved (possibly
edited) request sent exactly once; on rejection the body gets ``Rejected``."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from django.db import OperationalError, connections
from django.db.backends.signals import connection_created
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, ApprovalStatus, Artifact, ConflictArtifact
from core import coordination, wakeups
from core.leases import lease_acquire
from core.models import Lease, Tenant, TenantQuota, User
from core.redis_client import get_redis
from runs.context import AsyncStepContext, StepContext
from runs.definitions import ApprovalPolicy, WorkflowInput, workflow
from runs.dispatch import dispatch_round, load_room
from runs.executor import step_execute
from runs.interrupts import Rejected
from runs.invariants import check_invariants
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus, ToolCall, ToolCallStatus
from runs.services import run_start
from runs.tools import call_finish
from tests.approvals.helpers import pump, pump_until
from tests.concurrency import run_concurrently
from tests.conftest import bearer_client, make_member
from tests.dialects import RACING_THREADS, postgresql_only
from tests.wakes import wake_marks_cleared

pytestmark = pytest.mark.both_dialects


@pytest.fixture(autouse=True, params=["in place", "on coordination threads"])
def database_work(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test as a prefork worker runs steps and as a threads-pool worker does."""
    CRM.reset()
    if request.param == "on coordination threads":
        coordination.coordinate_on_threads(2)
    try:
        yield request.param
    finally:
        coordination.coordinate_in_place()


class FakeCrm:
    """The outside world: a CRM and a payments API that record every call they served."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_next = 0

    def call(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                raise ConnectionError(f"{name} is down")
            self.calls.append((name, request))
            return {"ok": True, "call": len(self.calls)}

    async def call_slowly(self, name: str, request: dict[str, Any], seconds: float) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(seconds)
            return self.call(name, request)
        finally:
            with self.lock:
                self.in_flight -= 1


CRM = FakeCrm()


class Ticket(WorkflowInput):
    customer: str = "c1"
    amount: int = 50
    fail_after: bool = False


FAILED_ONCE: set[str] = set()

support = workflow("test.tool_agent", description="an agent loop of governed calls", input=Ticket)


@support.step(lane="draft")
def handle_ticket(ctx: StepContext) -> dict[str, Any]:
    """Looks up the customer, refunds (a human approves above 100), updates the CRM under the
    contact's lock, answers; fails once after its calls when the input says so."""
    customer = ctx.input["customer"]
    found = ctx.tool("crm", lambda req: CRM.call("crm.lookup", req), request={"customer": customer})
    outcome = "no refund"
    try:
        refund = ctx.tool(
            "payments",
            lambda req: CRM.call("payments.refund", req),
            request={"customer": customer, "amount": ctx.input["amount"]},
            approval=lambda req: req["amount"] > 100,
        )
        outcome = f"refunded {refund['call']}"
    except Rejected as refused:
        outcome = f"refund refused: {refused.reason}"
    ctx.tool(
        "crm",
        lambda req: CRM.call("crm.update", req),
        request={"customer": customer, "note": outcome},
        locks=[f"contact:{customer}"],
    )
    if ctx.input["fail_after"] and ctx.run_id not in FAILED_ONCE:
        FAILED_ONCE.add(ctx.run_id)
        raise ConnectionError("the mail API dropped the connection")
    return {"looked_up": found["call"], "outcome": outcome}


def start(tenant: Tenant, **ticket: Any) -> Run:
    return run_start(tenant=tenant, workflow=support.key, input=ticket, actor="agent").run


def finished(run: Run) -> Run:
    pump_until(lambda: Run.objects.get(pk=run.pk).status in (RunStatus.SUCCEEDED, RunStatus.FAILED))
    return Run.objects.get(pk=run.pk)


def served(name: str) -> list[dict[str, Any]]:
    return [request for called, request in CRM.calls if called == name]


@pytest.mark.django_db(transaction=True)
def test_each_call_is_recorded_and_a_retry_of_the_step_is_answered_from_the_record(
    acme: Tenant, acme_operator: User
) -> None:
    run = finished(start(acme, customer="c7", fail_after=True))
    assert run.status == RunStatus.SUCCEEDED, list(run.steps.values_list("key", "status", "error"))
    step = Step.objects.get(run=run)
    assert step.attempt == 2  # the first attempt failed after its three calls
    # Each call happened once, though the step ran twice: the second attempt was answered.
    assert served("crm.lookup") == [{"customer": "c7"}]
    assert served("payments.refund") == [{"customer": "c7", "amount": 50}]
    assert served("crm.update") == [{"customer": "c7", "note": "refunded 2"}]
    calls = list(ToolCall.objects.filter(step=step).order_by("key").values_list("key", "tool", "status"))
    assert calls == [("1", "crm", "succeeded"), ("2", "payments", "succeeded"), ("3", "crm", "succeeded")]
    assert SideEffect.objects.filter(run=run, status=EffectStatus.COMMITTED).count() == 3
    assert ToolCall.objects.get(step=step, key="3").lock_keys == ["contact:c7"]
    assert not Lease.objects.filter(key__startswith="toolcall:", released_at__isnull=True).exists()
    # The API's run shows each call with its step and the key and reference of its effect.
    shown = bearer_client(acme_operator).get(f"/api/v1/runs/{run.id}").json()["tool_calls"]
    effects = {e.idempotency_key: e.external_ref for e in SideEffect.objects.filter(run=run)}
    assert [(c["key"], c["step"], c["status"]) for c in shown] == [
        ("1", step.key, "succeeded"),
        ("2", step.key, "succeeded"),
        ("3", step.key, "succeeded"),
    ]
    assert {c["idempotency_key"]: c["external_ref"] for c in shown} == effects
    assert check_invariants() == []


@pytest.mark.django_db(transaction=True)
def test_a_failed_call_is_sent_again_by_the_retry_under_the_same_key(acme: Tenant) -> None:
    CRM.fail_next = 1  # the lookup fails on the first attempt
    run = finished(start(acme, customer="c8"))
    assert run.status == RunStatus.SUCCEEDED
    assert served("crm.lookup") == [{"customer": "c8"}]
    lookup = ToolCall.objects.get(step__run=run, key="1")
    assert lookup.status == ToolCallStatus.SUCCEEDED and lookup.effect is not None
    assert lookup.effect.attempts == 2


@pytest.mark.django_db(transaction=True)
def test_a_call_over_the_limit_parks_the_step_holding_nothing_and_runs_once_approved(
    acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    run = start(acme, customer="c9", amount=250)
    pump()
    step = Step.objects.get(run=run)
    assert step.status == StepStatus.WAITING_APPROVAL
    assert Run.objects.get(pk=run.pk).status == RunStatus.WAITING_APPROVAL
    assert served("payments.refund") == []
    assert not Lease.objects.filter(holder__startswith=run.id, released_at__isnull=True).exists()
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    artifact = Artifact.objects.get(pk=request.artifact_id)
    assert (artifact.call_key, artifact.kind) == ("2", "payments")
    assert request.artifact_version.content == {"customer": "c9", "amount": 250}
    assert ToolCall.objects.get(step=step, key="2").status == ToolCallStatus.AWAITING_APPROVAL
    # An admin lowers the amount, an operator approves that version.
    approvals.artifact_edit(
        artifact=artifact, user=acme_admin, expected_version=1, content={"customer": "c9", "amount": 120}
    )
    edited = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    approvals.approval_decide(request=edited, user=acme_operator, decision="approve", expected_version=1)
    done = finished(run)
    assert done.status == RunStatus.SUCCEEDED, list(done.steps.values_list("key", "status", "error"))
    assert served("payments.refund") == [{"customer": "c9", "amount": 120}]
    assert served("crm.lookup") == [{"customer": "c9"}]  # the re-run was answered from the record
    assert Step.objects.get(pk=step.pk).attempt == 1  # the parked attempt is not counted
    assert check_invariants() == []


@pytest.mark.django_db(transaction=True)
def test_a_rejected_call_raises_rejected_in_the_body_which_goes_on(acme: Tenant, acme_operator: User) -> None:
    run = start(acme, customer="c10", amount=500)
    pump()
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    approvals.approval_decide(
        request=request, user=acme_operator, decision="reject", expected_version=1, comment="too much"
    )
    done = finished(run)
    assert done.status == RunStatus.SUCCEEDED
    assert Step.objects.get(run=run).output["outcome"] == "refund refused: too much"
    assert served("payments.refund") == []
    assert served("crm.update") == [{"customer": "c10", "note": "refund refused: too much"}]
    assert ToolCall.objects.get(step__run=run, key="2").status == ToolCallStatus.REJECTED


@pytest.mark.django_db(transaction=True)
def test_an_edit_after_the_approval_invalidates_it_and_nothing_is_sent_until_the_new_version_is_approved(
    acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    run = start(acme, customer="c11", amount=300)
    pump()
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    approvals.approval_decide(request=request, user=acme_operator, decision="approve", expected_version=1)
    # Before the step runs again, an edit: the approval no longer holds.
    artifact = Artifact.objects.get(pk=request.artifact_id)
    approvals.artifact_edit(
        artifact=artifact, user=acme_admin, expected_version=1, content={"customer": "c11", "amount": 101}
    )
    assert ApprovalRequest.objects.get(pk=request.pk).status == ApprovalStatus.INVALIDATED
    pump()
    assert served("payments.refund") == []
    assert Step.objects.get(run=run).status == StepStatus.WAITING_APPROVAL
    newest = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    approvals.approval_decide(request=newest, user=acme_operator, decision="approve", expected_version=1)
    assert finished(run).status == RunStatus.SUCCEEDED
    assert served("payments.refund") == [{"customer": "c11", "amount": 101}]


@pytest.mark.django_db(transaction=True)
def test_the_request_of_a_call_that_ran_can_no_longer_be_edited(acme: Tenant, acme_operator: User) -> None:
    run = start(acme, customer="c12", amount=200)
    pump()
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    approvals.approval_decide(request=request, user=acme_operator, decision="approve", expected_version=1)
    assert finished(run).status == RunStatus.SUCCEEDED
    artifact = Artifact.objects.get(pk=request.artifact_id)
    with pytest.raises(approvals.EditConflict):
        approvals.artifact_edit(
            artifact=artifact,
            user=acme_operator,
            expected_version=1,
            content={"customer": "c12", "amount": 1},
        )
    assert served("payments.refund") == [{"customer": "c12", "amount": 200}]


@pytest.mark.django_db(transaction=True)
def test_request_changes_is_refused_for_a_call(acme: Tenant, acme_operator: User) -> None:
    run = start(acme, customer="c13", amount=200)
    pump()
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    with pytest.raises(approvals.DecisionForbidden):
        approvals.approval_decide(
            request=request, user=acme_operator, decision="request_changes", expected_version=1
        )
    assert ApprovalRequest.objects.get(pk=request.pk).status == ApprovalStatus.PENDING


policy_flow = workflow("test.tool_policy", description="a call approved by two, timing out to reject")


@policy_flow.step(lane="external")
def pay(ctx: StepContext) -> dict[str, Any]:
    try:
        paid = ctx.tool(
            "payments",
            lambda req: CRM.call("payments.pay", req),
            request={"amount": 5},
            approval=ApprovalPolicy(required=2, timeout_seconds=0.2, on_timeout="reject"),
        )
    except Rejected as refused:
        return {"paid": False, "why": refused.reason}
    return {"paid": paid["ok"]}


@pytest.mark.django_db(transaction=True)
def test_a_call_approval_timing_out_reaches_the_body_as_a_rejection(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow=policy_flow.key, input={}, actor="agent").run
    pump()
    request = ApprovalRequest.objects.get(run=run)
    assert request.required == 2
    pump_until(
        lambda: (
            approvals.approvals_expire() == 0
            and not ApprovalRequest.objects.filter(status="pending").exists()
        )
    )
    done = finished(run)
    assert done.status == RunStatus.SUCCEEDED
    assert Step.objects.get(run=run).output == {"paid": False, "why": "timed out"}
    assert served("payments.pay") == []


async_flow = workflow("test.tool_async", description="async calls under a cap of the tool")


@async_flow.step(lane="draft")
async def enrich(ctx: AsyncStepContext) -> dict[str, Any]:
    results = []
    for n in range(3):
        answer = await ctx.tool(
            "crm", lambda req: CRM.call_slowly("crm.enrich", req, 0.05), request={"n": n, "run": ctx.run_id}
        )
        results.append(answer["call"])
    return {"calls": results}


@pytest.mark.django_db(transaction=True)
def test_calls_count_against_the_tools_cap_with_admitted_steps(acme: Tenant, database_work: str) -> None:
    """Six async steps, three calls each, a tenant cap of 2 on ``crm``: the steps run at once,
    their calls two at a time; every call once."""
    TenantQuota.objects.update_or_create(
        tenant=acme, defaults={"caps": {"tool": {"crm": 2}}, "max_concurrent_steps": 10}
    )
    runs = [run_start(tenant=acme, workflow=async_flow.key, input={}, actor="agent").run for _ in range(6)]
    admitted = dispatch_round()
    assert len(admitted) == 6
    threads = [
        threading.Thread(target=executed, kwargs={"step_id": a.step_id, "token": a.token}) for a in admitted
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED for run in runs)
    assert CRM.most_in_flight <= 2
    assert len(served("crm.enrich")) == 18
    assert len({(r["run"], r["n"]) for r in served("crm.enrich")}) == 18
    assert load_room(timezone.now()).held[f"tenant_tool:{acme.pk}:crm"] == 0  # every slot given back


def executed(*, step_id: int, token: int) -> None:
    try:
        step_execute(step_id=step_id, token=token)
    finally:
        connections.close_all()


sync_caller = workflow("test.tool_counted_sync", description="two governed calls from a plain step")
async_caller = workflow("test.tool_counted_async", description="two governed calls from an async step")


@sync_caller.step(lane="draft")
def sync_calls(ctx: StepContext) -> dict[str, Any]:
    for n in range(2):
        ctx.tool("crm", lambda req: CRM.call("crm.count", req), request={"n": n})
    return {}


@async_caller.step(lane="draft")
async def async_calls(ctx: AsyncStepContext) -> dict[str, Any]:
    for n in range(2):
        await ctx.tool("crm", lambda req: CRM.call_slowly("crm.count", req, 0), request={"n": n})
    return {}


class OnEveryConnection:
    """Django's execute wrapper ``wrapper`` on this thread's connections and on every one opened
    meanwhile (coordination threads and a step's own open theirs)."""

    def __init__(self, wrapper: Callable[..., Any]) -> None:
        self.wrapper = wrapper

    def __enter__(self) -> None:
        connection_created.connect(self._instrument, dispatch_uid="test-on-every-connection")
        for connection in connections.all(initialized_only=True):
            self._instrument(None, connection)

    def __exit__(self, *exc: object) -> None:
        connection_created.disconnect(dispatch_uid="test-on-every-connection")
        for connection in connections.all(initialized_only=True):
            connection.execute_wrappers.remove(self.wrapper)

    def _instrument(self, sender: Any, connection: Any, **kwargs: Any) -> None:
        if self.wrapper not in connection.execute_wrappers:
            connection.execute_wrappers.append(self.wrapper)


class EndFailsOnce:
    """An execute wrapper under which the first write of a call's successful end fails, as a
    connection dropping at that moment would."""

    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        ending = sql.startswith('UPDATE "runs_toolcall" SET "status"') and ToolCallStatus.SUCCEEDED in params
        if ending and not self.failed:
            self.failed += 1
            raise OperationalError("the connection dropped as the call's end was written")
        return execute(sql, params, many, context)


def first_attempt_with_its_calls_end_failing(tenant: Tenant, workflow_key: str) -> Run:
    """A new run of ``workflow_key`` whose first attempt runs with its call's end failing once."""
    run = run_start(tenant=tenant, workflow=workflow_key, input={}, actor="agent").run
    end_fails = EndFailsOnce()
    with OnEveryConnection(end_fails):
        (admitted,) = dispatch_round()
        executed(step_id=admitted.step_id, token=admitted.token)
    assert end_fails.failed == 1
    return run


class RunStatusReads:
    """Counts the heartbeats' checks of a run's status (``StepContext._heartbeat`` reads it
    first)."""

    STATEMENT = 'SELECT "runs_run"."status" AS "status" FROM "runs_run" WHERE "runs_run"."id" = '

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = 0

    def count(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith(self.STATEMENT):
            with self.lock:
                self.seen += 1
        return execute(sql, params, many, context)


@pytest.mark.django_db(transaction=True)
def test_a_governed_call_checks_with_the_database_once_sync_or_async(acme: Tenant) -> None:
    """Each call checks that its step still owns its work once, before it is recorded; an async
    call checked again before its effect, a read and a renewal's commit more while it held its
    slot."""
    reads = []
    counted = RunStatusReads()
    with OnEveryConnection(counted.count):
        for flow in (sync_caller, async_caller):
            run = run_start(tenant=acme, workflow=flow.key, input={}, actor="agent").run
            before = counted.seen
            assert finished(run).status == RunStatus.SUCCEEDED
            reads.append(counted.seen - before)
    assert len(served("crm.count")) == 4
    assert reads == [2, 2]


@pytest.mark.django_db(transaction=True)
def test_an_async_calls_end_failing_after_its_effect_is_recorded_leaves_it_for_the_retry(
    acme: Tenant,
) -> None:
    """The call's end (its record, its slot) fails once, right after its effect was recorded:
    the call is not taken for a failed one. The step's retry answers it from the ledger, and
    ends it then (the call answered from the record, not settled again); the CRM served it
    once."""
    run = first_attempt_with_its_calls_end_failing(acme, async_caller.key)
    # The attempt failed on the end's write; the call it was ending is not recorded as failed.
    assert ToolCall.objects.get(run=run, key="1").status == ToolCallStatus.RUNNING
    assert finished(run).status == RunStatus.SUCCEEDED
    assert [request["n"] for request in served("crm.count")] == [0, 1]  # each once
    assert (
        list(ToolCall.objects.filter(run=run).values_list("status", flat=True))
        == [ToolCallStatus.SUCCEEDED] * 2
    )
    assert SideEffect.objects.filter(run=run, status=EffectStatus.COMMITTED).count() == 2
    assert check_invariants() == []


capped_sync = workflow("test.tool_capped_sync", description="a plain step's call holding a lock, capped")
capped_async = workflow("test.tool_capped_async", description="an async step's call holding a lock, capped")


@capped_sync.step(lane="draft")
def capped_call(ctx: StepContext) -> dict[str, Any]:
    ctx.tool("crm", lambda req: CRM.call("crm.capped", req), request={"n": 1}, locks=["contact:c9"])
    return {}


@capped_async.step(lane="draft")
async def capped_call_async(ctx: AsyncStepContext) -> dict[str, Any]:
    await ctx.tool(
        "crm", lambda req: CRM.call_slowly("crm.capped", req, 0), request={"n": 1}, locks=["contact:c9"]
    )
    return {}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("flow", [capped_sync, capped_async], ids=["sync", "async"])
def test_a_calls_end_that_fails_to_be_written_gives_its_slot_and_locks_back_at_once(
    acme: Tenant, flow: Any
) -> None:
    """A call's end fails to be written (its effect recorded): the attempt fails, and the slot
    it held under the tool's cap of 1 and its entity lock are given back with it, not held
    from every other call until their leases run out. The retry then finishes the run."""
    TenantQuota.objects.update_or_create(tenant=acme, defaults={"caps": {"tool": {"crm": 1}}})
    run = first_attempt_with_its_calls_end_failing(acme, flow.key)
    assert Step.objects.get(run=run).status != StepStatus.SUCCEEDED  # the attempt failed
    call = ToolCall.objects.get(run=run)
    held = Lease.objects.filter(tenant=acme, released_at__isnull=True, expires_at__gt=timezone.now())
    assert not held.filter(key__in=[f"toolcall:{call.pk}", "contact:c9"]).exists()
    assert finished(run).status == RunStatus.SUCCEEDED
    assert served("crm.capped") == [{"n": 1}]  # once, the retry answered from the ledger


racing_refund = workflow(
    "test.tool_racing_refund", description="one refund a human approves, timing out to reject"
)


@racing_refund.step(lane="external")
def refund_once(ctx: StepContext) -> dict[str, Any]:
    try:
        paid = ctx.tool(
            "payments",
            lambda req: CRM.call("payments.refund", req),
            request={"amount": 400, "run": ctx.run_id},
            approval=ApprovalPolicy(timeout_seconds=3600, on_timeout="reject"),
        )
    except Rejected as refused:
        return {"refunded": False, "why": refused.reason}
    return {"refunded": True, "call": paid["call"]}


APPROVERS = 16
RACE_TRIALS = 4


def race_one_call(request: ApprovalRequest, stale: Any, approvers: list[User], i: int) -> Any:
    """The i-th racer: an approver, the approval's timeout, or the parked attempt's task again."""
    if i < APPROVERS:
        return approvals.approval_decide(
            request=request, user=approvers[i], decision="approve", expected_version=1
        ).status
    if i == APPROVERS:
        return f"expired {approvals.approvals_expire()}"
    return step_execute(step_id=stale.step_id, token=stale.token)


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_sixteen_approvers_a_timeout_and_a_stale_delivery_race_one_call_sends_at_most_once(
    acme: Tenant, database_work: str
) -> None:
    """Per trial: 16 operators approve the parked call, its timeout fires (reject) and the
    parked attempt's task is delivered again, all at once. One decision wins; the call is sent
    exactly once with the approved request when an approval won, never when the timeout did."""
    approvers = [make_member(f"approver{n}", acme, "operator") for n in range(APPROVERS)]
    outcomes = Counter[str]()
    for trial in range(RACE_TRIALS):
        CRM.reset()
        run = run_start(tenant=acme, workflow=racing_refund.key, input={}, actor="agent").run
        admitted = dispatch_round()
        stale = admitted[0]
        step_execute(step_id=stale.step_id, token=stale.token)
        request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
        ApprovalRequest.objects.filter(pk=request.pk).update(expires_at=timezone.now())

        results = run_concurrently(partial(race_one_call, request, stale, approvers), APPROVERS + 2)
        approved = [r for r in results[:APPROVERS] if r == ApprovalStatus.APPROVED]
        refused = [r for r in results[:APPROVERS] if isinstance(r, approvals.DecisionConflict)]
        assert len(approved) + len(refused) == APPROVERS, results
        expired = results[APPROVERS] == "expired 1"
        assert len(approved) + int(expired) == 1, results  # one decision won
        assert results[APPROVERS + 1] == "not-ours", results
        done = finished(run)
        assert done.status == RunStatus.SUCCEEDED, list(done.steps.values_list("status", "error"))
        refunds = served("payments.refund")
        if approved:
            assert refunds == [{"amount": 400, "run": run.id}], (trial, refunds)
            assert Step.objects.get(run=run).output == {"refunded": True, "call": 1}
            outcomes["approved"] += 1
        else:
            assert refunds == [], (trial, refunds)
            assert Step.objects.get(run=run).output == {"refunded": False, "why": "timed out"}
            outcomes["timed out"] += 1
        effects = SideEffect.objects.filter(run=run)
        assert effects.count() == (1 if approved else 0)
    print(f"{RACE_TRIALS} trials: {dict(outcomes)}")
    assert check_invariants() == []
    # Then a normal run still goes through.
    assert finished(start(acme, customer="after")).status == RunStatus.SUCCEEDED


frozen = workflow("test.frozen_inputs", description="a step that fails once after reading the draft")
FROZEN_FAILED: set[str] = set()


@frozen.step(lane="draft")
def draft(ctx: StepContext) -> dict[str, Any]:
    return {"text": "first draft"}


@frozen.step(lane="external")
def send(ctx: StepContext) -> dict[str, Any]:
    text = ctx.outputs["draft"]["text"]
    if ctx.run_id not in FROZEN_FAILED:
        FROZEN_FAILED.add(ctx.run_id)
        raise ConnectionError("the provider dropped the connection")
    return {"sent": text}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("resolution", ["apply_proposed", "cancel_run"])
def test_an_attempt_on_changed_inputs_is_refused_as_a_conflict_showing_both(
    acme: Tenant, acme_reviewer: User, resolution: str
) -> None:
    run = run_start(tenant=acme, workflow=frozen.key, input={}, actor="agent").run
    pump_until(lambda: Step.objects.get(run=run, key="send").attempt == 1)
    send_step = Step.objects.get(run=run, key="send")
    assert send_step.status == StepStatus.READY and send_step.input_hash  # what it started from, kept
    assert send_step.started_from == {"input": {}, "outputs": {"draft": {"text": "first draft"}}}
    # Between the attempts, the earlier step's output changes under the run.
    Step.objects.filter(run=run, key="draft").update(output={"text": "a different draft"})
    pump_until(lambda: Run.objects.get(pk=run.pk).status == RunStatus.CONFLICT)
    conflict = ConflictArtifact.objects.get(run=run, kind="changed_inputs")
    assert conflict.current == {"input": {}, "outputs": {"draft": {"text": "a different draft"}}}
    assert conflict.proposed == {"input": {}, "outputs": {"draft": {"text": "first draft"}}}
    assert Step.objects.get(pk=send_step.pk).output is None  # it did not run on them
    approvals.conflict_resolve(
        conflict=conflict, user=acme_reviewer, expected_version=1, resolution=resolution
    )
    done = finished(run) if resolution == "apply_proposed" else Run.objects.get(pk=run.pk)
    if resolution == "apply_proposed":
        assert done.status == RunStatus.SUCCEEDED
        assert Step.objects.get(pk=send_step.pk).output == {"sent": "a different draft"}
    else:
        assert done.status == RunStatus.CANCELLED
    assert check_invariants() == []


DIVERGED_ONCE: set[str] = set()
diverging = workflow(
    "test.tool_diverging", description="a body that decides from something else than its calls"
)


@diverging.step(lane="draft")
def decide_from_the_clock(ctx: StepContext) -> dict[str, Any]:
    first_attempt = ctx.run_id not in DIVERGED_ONCE
    DIVERGED_ONCE.add(ctx.run_id)
    # Attempt 1 refunds at its first call; attempt 2, deciding anew, would send a mail there.
    tool, request = ("payments", {"amount": 5}) if first_attempt else ("messaging", {"to": "x"})
    ctx.tool(tool, lambda req: CRM.call(tool, req), request=request)
    if first_attempt:
        raise ConnectionError("dropped after the call")
    return {}


unapproved = workflow("test.tool_unapproved", description="a rejected call the body does not handle")


@unapproved.step(lane="draft")
def pay_without_handling(ctx: StepContext) -> dict[str, Any]:
    ctx.tool("payments", lambda req: CRM.call("payments.pay", req), request={"amount": 9}, approval=True)
    return {}


@pytest.mark.django_db(transaction=True)
def test_a_call_that_differs_from_the_recorded_one_at_its_place_fails_the_step_and_is_not_sent(
    acme: Tenant,
) -> None:
    run = run_start(tenant=acme, workflow=diverging.key, input={}, actor="t").run
    done = finished(run)
    assert done.status == RunStatus.FAILED
    step = Step.objects.get(run=run)
    assert "must make the same calls in the same order" in step.error and step.attempt == 2
    assert served("payments") == [{"amount": 5}] and served("messaging") == []


@pytest.mark.django_db(transaction=True)
def test_a_rejection_the_body_does_not_handle_fails_the_step_without_retries(
    acme: Tenant, acme_operator: User
) -> None:
    run = run_start(tenant=acme, workflow=unapproved.key, input={}, actor="t").run
    pump()
    request = ApprovalRequest.objects.get(run=run, status=ApprovalStatus.PENDING)
    approvals.approval_decide(request=request, user=acme_operator, decision="reject", expected_version=1)
    done = finished(run)
    assert done.status == RunStatus.FAILED
    step = Step.objects.get(run=run)
    assert step.attempt == 1 and "not approved" in step.error
    assert served("payments.pay") == []


@postgresql_only("reads the dispatcher's wake-up in Redis; the embedded default has no REDIS_URL")
@pytest.mark.django_db(transaction=True)
def test_a_call_giving_back_its_slot_wakes_the_dispatcher_while_steps_wait_for_room(acme: Tenant) -> None:
    # A step counted against the tool's cap waits in the dispatcher for the room the call frees:
    # the round comes at once, not at the next sweep.
    client = get_redis()
    assert client is not None
    run = run_start(tenant=acme, workflow=async_flow.key, input={}, actor="agent").run
    step = run.steps.get()

    def finish_a_call(key: str) -> None:
        call = ToolCall.objects.create(
            tenant=acme, run=run, step=step, key=key, tool="crm", status=ToolCallStatus.RUNNING
        )
        slot = lease_acquire(tenant_id=acme.pk, key=f"toolcall:{call.pk}", holder="test", ttl=30)
        assert slot is not None
        call_finish(call, ToolCallStatus.SUCCEEDED, idempotency_key=f"none-{key}", release=[slot])

    try:
        wake_marks_cleared(wakeups.WAKE_KEY)  # the start's own
        wakeups.mark_waiting(True)
        finish_a_call("a")
        assert client.delete(wakeups.WAKE_KEY)
        wakeups.mark_waiting(False)  # nothing waits for room: no round
        finish_a_call("b")
        assert not client.delete(wakeups.WAKE_KEY)
    finally:
        wakeups.mark_waiting(False, saturated=set())
        client.delete(wakeups.WAKE_KEY)
