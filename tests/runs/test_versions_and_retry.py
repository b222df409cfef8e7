"""Pinned workflow versions, retry and replay (issue 9): a deploy never moves a run in flight
onto another step list; a retried run never repeats a committed effect; a replay is a new,
linked run. Driven in-process with the real dispatcher round and executor on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from core.models import Event, Tenant, User
from demo import sandbox
from demo.models import SandboxCall
from runs.context import StepContext
from runs.definitions import WorkflowInput, get_workflow, unregister, workflow
from runs.models import Run, Step
from runs.services import RunNotRetryable, run_retry, run_start
from tests.approvals.helpers import pump
from tests.concurrency import run_concurrently
from tests.conftest import bearer_client
from tests.dialects import RACING_THREADS

pytestmark = pytest.mark.both_dialects


class Note(WorkflowInput):
    text: str = "hello"


def _declare_v1() -> None:
    v1 = workflow("test.versioned", description="version 1", input=Note, version=1)

    @v1.step(key="prepare", lane="read")
    def prepare_v1(ctx: StepContext) -> dict[str, Any]:
        return {"by": "v1"}

    @v1.step(key="finish_v1", lane="read")
    def finish_v1(ctx: StepContext) -> dict[str, Any]:
        return {"by": "v1", "saw": ctx.outputs["prepare"]["by"]}


def _declare_v2() -> None:
    v2 = workflow("test.versioned", description="version 2", input=Note, version=2)

    @v2.step(key="prepare", lane="read")
    def prepare_v2(ctx: StepContext) -> dict[str, Any]:
        return {"by": "v2"}

    @v2.step(key="review", lane="draft")
    def review(ctx: StepContext) -> dict[str, Any]:
        return {"by": "v2"}

    @v2.step(key="finish_v2", lane="read")
    def finish_v2(ctx: StepContext) -> dict[str, Any]:
        return {"by": "v2"}


@pytest.fixture
def versioned() -> Iterator[None]:
    _declare_v1()
    yield
    unregister("test.versioned")


@pytest.mark.django_db(transaction=True)
def test_runs_in_flight_finish_on_their_version_and_new_runs_take_the_new_one(
    acme: Tenant, versioned: None
) -> None:
    old = run_start(tenant=acme, workflow="test.versioned", input={}, actor="t").run
    assert old.workflow_version == "1"
    _declare_v2()  # the deploy: version 2 beside version 1
    assert get_workflow("test.versioned").version == "2"
    new = run_start(tenant=acme, workflow="test.versioned", input={}, actor="t").run
    assert new.workflow_version == "2"
    pump(rounds=20)
    old_steps = dict(Step.objects.filter(run=old).values_list("key", "output"))
    new_steps = dict(Step.objects.filter(run=new).values_list("key", "output"))
    assert old_steps == {"prepare": {"by": "v1"}, "finish_v1": {"by": "v1", "saw": "v1"}}
    assert new_steps == {"prepare": {"by": "v2"}, "review": {"by": "v2"}, "finish_v2": {"by": "v2"}}
    assert Run.objects.get(pk=old.pk).status == Run.objects.get(pk=new.pk).status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_a_run_whose_version_is_gone_fails_with_the_reason_and_others_go_on(
    acme: Tenant, versioned: None
) -> None:
    stranded = run_start(tenant=acme, workflow="test.versioned", input={}, actor="t").run
    _declare_v2()
    unregister("test.versioned", version="1")  # a deploy that dropped version 1
    fine = run_start(tenant=acme, workflow="test.versioned", input={}, actor="t").run
    pump(rounds=20)
    stranded.refresh_from_db()
    assert stranded.status == "failed"
    step = Step.objects.get(run=stranded, key="prepare")
    assert "version 1 is no longer registered" in step.error
    assert Run.objects.get(pk=fine.pk).status == "succeeded"
    with pytest.raises(RunNotRetryable, match="no longer registered"):
        run_retry(run=stranded, actor="t")


def test_a_derived_version_changes_with_the_step_list() -> None:
    first = workflow("test.derived_a", description="")
    first.step(key="one", lane="read")(lambda ctx: {})
    same = workflow("test.derived_b", description="")
    same.step(key="one", lane="read")(lambda ctx: {})
    other = workflow("test.derived_c", description="")
    other.step(key="one", lane="draft")(lambda ctx: {})
    try:
        assert first.version == same.version, "the version comes from the steps, not the key"
        assert first.version != other.version, "another lane is another version"
    finally:
        for key in ("test.derived_a", "test.derived_b", "test.derived_c"):
            unregister(key)


# A step that sends once, then fails on its first attempt only after the send committed.
flaky_send = workflow("test.flaky_send", description="sends, then fails on attempt 1", input=Note)


@flaky_send.step(lane="external", tool="messaging", max_attempts=1)
def send_then_fail(ctx: StepContext) -> dict[str, Any]:
    sent = ctx.effect(
        "messaging.send",
        lambda: sandbox.messaging_send(
            tenant_id=ctx.tenant_id, to="x@example.com", subject="s", body=str(ctx.input.get("text"))
        ),
        request={"text": ctx.input.get("text")},
    )
    if ctx.attempt == 1:
        raise RuntimeError("the CRM timed out after the message went out")
    return {"message_id": sent["message_id"]}


def sends() -> int:
    return SandboxCall.objects.filter(operation="send").count()


@pytest.mark.django_db(transaction=True)
def test_retry_after_a_committed_effect_never_repeats_it(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User, globex_operator: User
) -> None:
    run = run_start(tenant=sandbox_acme, workflow="test.flaky_send", input={"text": "hi"}, actor="t").run
    pump()
    run.refresh_from_db()
    assert run.status == "failed" and sends() == 1

    assert bearer_client(acme_reviewer).post(f"/api/v1/runs/{run.id}/retry").status_code == 403
    assert bearer_client(globex_operator).post(f"/api/v1/runs/{run.id}/retry").status_code == 404
    response = bearer_client(acme_operator).post(f"/api/v1/runs/{run.id}/retry")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "pending" and response.json()["retries"] == 1
    pump()
    run.refresh_from_db()
    assert run.status == "succeeded"
    assert sends() == 1, "the committed send was answered from the ledger, not sent again"
    assert Step.objects.get(run=run).attempt == 2
    assert Event.objects.filter(
        subject=f"run:{run.id}", verb="run_retried", actor=acme_operator.username
    ).exists()

    again = bearer_client(acme_operator).post(f"/api/v1/runs/{run.id}/retry")
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_not_retryable"


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_racing_retries_retry_once(sandbox_acme: Tenant) -> None:
    for _ in range(5):
        run = run_start(tenant=sandbox_acme, workflow="test.flaky_send", input={}, actor="t").run
        pump()
        outcomes = run_concurrently(
            lambda i, run=run: run_retry(run=Run.objects.get(pk=run.pk), actor=f"op{i}"), 8
        )
        assert sum(isinstance(o, Run) for o in outcomes) == 1, outcomes
        assert all(isinstance(o, (Run, RunNotRetryable)) for o in outcomes), outcomes
        assert Run.objects.get(pk=run.pk).retries == 1
        pump()
        assert Run.objects.get(pk=run.pk).status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_replay_starts_a_linked_run_with_validated_input(sandbox_acme: Tenant, acme_operator: User) -> None:
    client = bearer_client(acme_operator)
    original = run_start(
        tenant=sandbox_acme, workflow="test.flaky_send", input={"text": "one"}, actor="t"
    ).run
    pump()
    before = Run.objects.count()
    bad = client.post(
        f"/api/v1/runs/{original.id}/replay",
        {"input": {"text": 5, "extra": 1}},
        content_type="application/json",
    )
    assert bad.status_code == 422 and set(bad.json()["error"]["details"]["fields"]) == {"text", "extra"}
    assert Run.objects.count() == before, "a refused replay stores nothing"

    plain = client.post(f"/api/v1/runs/{original.id}/replay", content_type="application/json")  # no body
    assert plain.status_code == 201, plain.content
    assert plain.json()["replay_of"] == original.id and plain.json()["input"] == {"text": "one"}
    edited = client.post(
        f"/api/v1/runs/{original.id}/replay", {"input": {"text": "two"}}, content_type="application/json"
    )
    assert edited.status_code == 201 and edited.json()["input"] == {"text": "two"}
    assert set(Run.objects.get(pk=original.pk).replays.values_list("id", flat=True)) == {
        plain.json()["id"],
        edited.json()["id"],
    }
    pump()
    # Each replay is its own run with its own keys: it sends again (and fails like the original).
    assert sends() == 3
    assert Event.objects.filter(subject=f"run:{original.id}", verb="run_replayed").count() == 2


@pytest.mark.django_db(transaction=True)
def test_retry_after_a_rejection_asks_for_approval_again(acme: Tenant, acme_operator: User) -> None:
    from approvals.models import ApprovalRequest
    from approvals.services import approval_decide
    from tests.approvals.helpers import pending_request

    run = run_start(tenant=acme, workflow="test.chat_gated", input={"message": "hi"}, actor="t").run
    pump()
    request = pending_request(run)
    approval_decide(request=request, user=acme_operator, decision="reject", expected_version=request.version)
    pump()
    assert Run.objects.get(pk=run.pk).status == "failed"
    run_retry(run=run, actor="op")
    pump()
    assert Run.objects.get(pk=run.pk).status == "waiting_approval", "the retried step asks again"
    fresh = pending_request(run)
    assert fresh.pk != request.pk
    assert ApprovalRequest.objects.filter(step__run=run).count() == 2
    approval_decide(request=fresh, user=acme_operator, decision="approve", expected_version=fresh.version)
    pump()
    assert Run.objects.get(pk=run.pk).status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_replay_keeps_environment_and_session_and_may_name_other_connections(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    from core.connections import connection_add, connection_update
    from core.models import Connection

    original = run_start(
        tenant=sandbox_acme,
        workflow="demo.chat_reply",
        input={"contact_id": 1, "message": "hello"},
        actor="t",
        environment="staging",
        session_key="conv-r",
    ).run
    pump()
    crm = Connection.objects.get(tenant=sandbox_acme, environment="staging", provider="crm", is_default=True)
    other = connection_add(
        tenant=sandbox_acme, environment="staging", provider="crm", name="crm-b", actor="t"
    )
    connection_update(connection=crm, actor="t", archived=True)
    client = bearer_client(acme_operator)
    gone = client.post(f"/api/v1/runs/{original.id}/replay", content_type="application/json")
    assert gone.status_code == 422 and "connections.crm" in gone.json()["error"]["details"]["fields"]
    ok = client.post(
        f"/api/v1/runs/{original.id}/replay",
        {"connections": {"crm": "crm-b"}},
        content_type="application/json",
    )
    assert ok.status_code == 201, ok.content
    body = ok.json()
    assert body["environment"] == "staging" and body["session"]["key"] == "conv-r"
    assert (
        body["connections"]["crm"] == "crm-b"
        and Run.objects.get(pk=body["id"]).connections["crm"]["id"] == other.pk
    )
