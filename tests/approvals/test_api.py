from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.conf import settings
from django.db import connections
from django.test import Client

from approvals.models import ApprovalRequest, ConflictArtifact
from core import rawsql
from core import services as core_services
from core.models import Role, Tenant, User
from demo.models import SandboxCall
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.approvals.helpers import pending_request, waiting_followup
from tests.concurrency import run_concurrently
from tests.conftest import bearer_client, make_member, post_run
from tests.runs.cluster import Cluster, wait_for
from tests.servers import base_env, console_server, database_url

pytestmark = pytest.mark.django_db(transaction=True)

T = TypeVar("T")


def post(client: Client, url: str, body: dict | None = None, **headers: str):  # type: ignore[no-untyped-def]
    return client.post(url, data=json.dumps(body or {}), content_type="application/json", headers=headers)


def test_an_approval_carries_its_version_artifact_and_etag(sandbox_acme: Tenant, acme_operator: User) -> None:
    request = waiting_followup(sandbox_acme)
    client = bearer_client(acme_operator)
    response = client.get(f"/api/v1/approvals/{request.pk}")
    assert response.status_code == 200
    assert response["ETag"] == '"1"'
    body = response.json()
    assert (body["run_id"], body["step_key"], body["status"], body["version"], body["artifact_version"]) == (
        request.run_id, "send_message", "pending", 1, 1,
    )  # fmt: skip
    assert set(body["artifact"]["content"]) == {"subject", "body"}
    listed = client.get("/api/v1/approvals?status=pending").json()
    assert [a["id"] for a in listed] == [request.pk]
    assert client.get("/api/v1/approvals?status=maybe").status_code == 400


def test_a_decision_without_a_body_says_a_json_body_is_required_and_changes_nothing(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    request = waiting_followup(sandbox_acme)
    response = bearer_client(acme_operator).generic(  # as `curl -X POST` sends it: no body at all
        "POST", f"/api/v1/approvals/{request.pk}/approve", headers={"If-Match": '"1"'}
    )
    assert response.status_code == 422, response.content
    assert "JSON body is required" in response.json()["error"]["details"]["fields"]["__all__"]
    request.refresh_from_db()
    assert (request.status, request.version) == ("pending", 1)


def test_deciding_needs_if_match_and_a_stale_one_gets_412_with_the_current_state(
    sandbox_acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    request = waiting_followup(sandbox_acme)
    url = f"/api/v1/approvals/{request.pk}/approve"
    operator = bearer_client(acme_operator)
    missing = post(operator, url)
    assert missing.status_code == 428
    assert missing.json()["error"]["code"] == "precondition_required"
    assert post(operator, url, **{"If-Match": "abc"}).status_code == 400
    won = post(operator, url, {"comment": "ok"}, **{"If-Match": '"1"'})
    assert won.status_code == 200
    assert won["ETag"] == '"2"'
    lost = post(bearer_client(acme_admin), f"/api/v1/approvals/{request.pk}/reject", **{"If-Match": '"1"'})
    assert lost.status_code == 412
    error = lost.json()["error"]
    assert error["code"] == "precondition_failed"
    assert "decided by operator on artifact version 1" in error["message"]
    assert error["details"]["current"]["status"] == "approved"
    assert ApprovalRequest.objects.get(pk=request.pk).status == "approved"


def test_another_tenants_approval_is_a_404(sandbox_acme: Tenant, globex_operator: User) -> None:
    request = waiting_followup(sandbox_acme)
    client = bearer_client(globex_operator)
    assert client.get(f"/api/v1/approvals/{request.pk}").status_code == 404
    assert post(client, f"/api/v1/approvals/{request.pk}/approve", **{"If-Match": '"1"'}).status_code == 404
    assert ApprovalRequest.objects.get(pk=request.pk).status == "pending"
    # Ids no request can have are not found either (no database error for one past a bigint).
    for missing in (0, -1, 2**63 - 1, 2**63):
        assert client.get(f"/api/v1/approvals/{missing}").status_code == 404, missing


def _on_a_preparing_thread(call: Callable[[], T]) -> T:
    """``call()`` on a thread that prepares its hand-written statements, as the web process's
    request threads do (the test client's own thread does not), with a connection of its own."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        rawsql.prepare_on_this_thread()
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def test_the_request_threads_prepared_statements_answer_as_the_plain_ones(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    shown, decided = waiting_followup(sandbox_acme), waiting_followup(sandbox_acme)
    client = bearer_client(acme_operator)

    def reads() -> tuple[Any, Any]:
        return (
            client.get(f"/api/v1/approvals/{shown.pk}").json(),
            client.get(f"/api/v1/runs/{shown.run_id}").json(),
        )

    plain = reads()
    for _ in range(2):  # prepared on the first call, run as prepared on the second
        assert _on_a_preparing_thread(reads) == plain
    for missing in (2**63 - 1, 2**63):  # a prepared bigint parameter refuses the second
        url = f"/api/v1/approvals/{missing}"
        assert _on_a_preparing_thread(partial(client.get, url)).status_code == 404
    approve = f"/api/v1/approvals/{decided.pk}/approve"
    won = _on_a_preparing_thread(lambda: post(client, approve, **{"If-Match": '"1"'}))
    assert (won.status_code, won.json()["status"]) == (200, "approved")
    lost = _on_a_preparing_thread(lambda: post(client, approve, **{"If-Match": '"1"'}))
    assert lost.status_code == 412
    lead = {"workflow": "demo.enrich_lead", "input": {"lead_id": 3}}
    first = post_run(client, lead, **{"Idempotency-Key": "prepared-1"})
    again = _on_a_preparing_thread(lambda: post_run(client, lead, **{"Idempotency-Key": "prepared-1"}))
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_editing_the_artifact_invalidates_the_approval_and_shows_a_diff(
    sandbox_acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    request = waiting_followup(sandbox_acme)
    operator = bearer_client(acme_operator)
    post(operator, f"/api/v1/approvals/{request.pk}/approve", **{"If-Match": '"1"'})
    edit_url = f"/api/v1/approvals/{request.pk}/artifact"
    assert post(operator, edit_url, {"content": {"subject": "x", "body": "y"}}).status_code == 428
    edited = post(
        operator, edit_url, {"content": {"subject": "Shorter", "body": "Call?"}}, **{"If-Match": '"1"'}
    )
    assert edited.status_code == 201, edited.content
    body = edited.json()
    assert (body["status"], body["artifact_version"], body["artifact"]["content"]["subject"]) == (
        "pending",
        2,
        "Shorter",
    )
    assert body["diff_against"] == 1
    assert "+  Shorter" in body["diff"] and any(line.startswith("-  Next steps") for line in body["diff"])
    assert ApprovalRequest.objects.get(pk=request.pk).status == "invalidated"
    stale = post(
        bearer_client(acme_admin), edit_url, {"content": {"subject": "z", "body": "z"}}, **{"If-Match": '"1"'}
    )
    assert stale.status_code == 412
    conflict_id = stale.json()["error"]["details"]["conflict_id"]
    assert ConflictArtifact.objects.get(pk=conflict_id).kind == "concurrent_edit"


def test_conflicts_are_resolved_by_reviewers_with_if_match(
    acme: Tenant, acme_operator: User, acme_reviewer: User
) -> None:
    from approvals.services import record_conflict

    conflict = record_conflict(
        "duplicate_trigger_payload",
        tenant_id=acme.pk,
        target_key="trigger:t",
        current={"a": 1},
        proposed={"a": 2},
    )
    reviewer = bearer_client(acme_reviewer)
    listed = reviewer.get("/api/v1/conflicts?status=open").json()
    assert [c["id"] for c in listed] == [conflict.pk]
    assert listed[0]["diff"] and listed[0]["suggestion"]
    detail = reviewer.get(f"/api/v1/conflicts/{conflict.pk}")
    assert detail["ETag"] == '"1"'
    url = f"/api/v1/conflicts/{conflict.pk}/resolve"
    assert (
        post(
            bearer_client(acme_operator), url, {"resolution": "acknowledge"}, **{"If-Match": '"1"'}
        ).status_code
        == 403
    )
    assert post(reviewer, url, {"resolution": "acknowledge"}).status_code == 428
    assert post(reviewer, url, {"resolution": "explode"}, **{"If-Match": '"1"'}).status_code == 400
    done = post(reviewer, url, {"resolution": "acknowledge", "note": "fine"}, **{"If-Match": '"1"'})
    assert done.status_code == 200
    assert (done.json()["status"], done.json()["resolved_by"], done.json()["note"]) == (
        "resolved",
        "reviewer",
        "fine",
    )
    again = post(reviewer, url, {"resolution": "acknowledge"}, **{"If-Match": '"1"'})
    assert again.status_code == 412
    assert again.json()["error"]["details"]["current"]["status"] == "resolved"


def _http(method: str, url: str, token: str, headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    request = urllib.request.Request(
        url, method=method, data=b"{}" if method == "POST" else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response), response.headers  # case-insensitive
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused), refused.headers


@pytest.mark.timeout(300)
def test_thirty_two_operators_approving_at_once_over_http_make_exactly_one_winner(
    sandbox_acme: Tenant, tmp_path: Path
) -> None:
    operators = [make_member(f"op{i}", sandbox_acme, Role.OPERATOR) for i in range(32)]
    tokens = [core_services.api_token_issue(user=user) for user in operators]
    env = base_env(
        DEBUG="1",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
    )
    cluster = Cluster(tmp_path)
    try:
        cluster.worker("w1")
        cluster.beat()
        with console_server(env, tmp_path / "web.log", workers=4) as base:
            for trial in range(6):
                run = run_start(
                    tenant=sandbox_acme,
                    workflow="demo.lead_followup",
                    input={"lead_id": trial + 1, "contact_id": 1},
                    actor="bot",
                ).run
                wait_for(
                    lambda run=run: Run.objects.get(pk=run.pk).status == RunStatus.WAITING_APPROVAL,
                    60,
                    cluster.logs,
                )
                approval = ApprovalRequest.objects.get(run=run, status="pending")
                status, _, headers = _http("GET", f"{base}/api/v1/approvals/{approval.pk}", tokens[0])
                etag = headers["ETag"]
                url = f"{base}/api/v1/approvals/{approval.pk}/approve"
                results = run_concurrently(
                    lambda i, url=url, etag=etag: _http("POST", url, tokens[i], {"If-Match": etag}), 32
                )
                codes = sorted(code for code, _, _ in results)
                assert codes == [200] + [412] * 31, codes
                winner = next(body for code, body, _ in results if code == 200)
                losers = [body for code, body, _ in results if code == 412]
                assert all(
                    b["error"]["details"]["current"]["decided_by"] == winner["decided_by"] for b in losers
                )
                wait_for(
                    lambda run=run: Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED,
                    60,
                    cluster.logs,
                )
                assert (
                    SandboxCall.objects.filter(
                        connector="messaging", idempotency_key=f"{run.id}:send_message"
                    ).count()
                    == 1
                )
    finally:
        cluster.stop()


@pytest.mark.timeout(180)
def test_the_gated_demo_workflows_complete_on_real_workers_after_approval(
    sandbox_acme: Tenant, acme_operator: User, cluster: Cluster
) -> None:
    from approvals.services import approval_decide
    from demo.models import SandboxInvoice
    from runs.models import Step

    cluster.worker("w1")
    cluster.beat()
    payment = run_start(
        tenant=sandbox_acme,
        workflow="demo.invoice_payment",
        input={"invoice_id": 3, "amount": "120.00"},
        actor="bot",
    ).run
    followup = run_start(
        tenant=sandbox_acme, workflow="demo.lead_followup", input={"lead_id": 7, "contact_id": 1}, actor="bot"
    ).run
    for run in (payment, followup):
        wait_for(
            lambda run=run: Run.objects.get(pk=run.pk).status == RunStatus.WAITING_APPROVAL,
            60,
            cluster.logs,
        )
        request = pending_request(run)
        approval_decide(
            request=request, user=acme_operator, decision="approve", expected_version=request.version
        )
        wait_for(lambda run=run: Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED, 60, cluster.logs)
    invoice = SandboxInvoice.objects.get(tenant=sandbox_acme, number=3)
    assert str(invoice.amount_paid) == "120.00"
    assert SandboxCall.objects.filter(connector="payments").count() == 1
    assert Step.objects.get(run=payment, key="charge").lock_keys == ["invoice:3"]
    assert SandboxCall.objects.filter(connector="messaging").count() == 1
    # An async step (the draft, awaiting the model stand-in) between plain ones, on the worker.
    steps = {step.key: step for step in Step.objects.filter(run=followup)}
    assert [(steps[key].lane, steps[key].status) for key in ("enrich", "draft_message", "send_message")] == [
        ("read", "succeeded"),
        ("draft", "succeeded"),
        ("external", "succeeded"),
    ]
    lead_name = steps["enrich"].output["lead"]["name"]
    assert steps["draft_message"].output["body"].startswith(f"Hi {lead_name},")
