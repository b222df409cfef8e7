"""Agents that run outside Runwarden get its leases and its ledger over HTTP: a lease with a
fencing token, refused once stale; an effect proposed before it is performed, answered from
the ledger when asked again, fenced by a lease; each tenant's keys its own. Last, a separate
process using only ``runwarden.client`` against a real web process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, Artifact
from core import services
from core.models import Lease, OutboxMessage, Tenant, User
from runs.models import EffectStatus, Run, RunStatus, SideEffect
from runs.services import run_start
from tests.approvals.helpers import pump, pump_until
from tests.conftest import bearer_client, make_member
from tests.servers import ROOT, base_env, console_server, database_url


def post(client: Client, path: str, body: dict[str, Any]) -> Any:
    return client.post(f"/api/v1{path}", data=json.dumps(body), content_type="application/json")


def expire(key: str) -> None:
    Lease.objects.filter(key=key).update(expires_at=timezone.now() - timedelta(seconds=1))


@pytest.mark.django_db(transaction=True)
def test_a_lease_is_fenced_by_its_token_and_a_stale_one_writes_nothing(
    acme: Tenant, acme_operator: User
) -> None:
    agent = bearer_client(acme_operator)
    taken = post(
        agent, "/leases/acquire", {"key": "crm_contact:9", "holder": "billing-agent", "ttl_seconds": 30}
    )
    assert taken.status_code == 201, taken.content
    first = taken.json()["token"]
    held = post(agent, "/leases/acquire", {"key": "crm_contact:9", "holder": "another-agent"})
    assert held.status_code == 409 and held.json()["error"]["code"] == "lease_held"
    assert held.json()["error"]["details"]["holder"] == "outside:billing-agent"
    renewed = post(agent, "/leases/renew", {"key": "crm_contact:9", "token": first, "ttl_seconds": 60})
    assert renewed.status_code == 200 and renewed.json()["token"] == first

    # It runs out; another agent takes the key with a higher token; the first one's writes fail.
    expire("crm_contact:9")
    second = post(agent, "/leases/acquire", {"key": "crm_contact:9", "holder": "another-agent"}).json()[
        "token"
    ]
    assert second > first
    for path, body in (
        ("/leases/renew", {"key": "crm_contact:9", "token": first}),
        ("/leases/release", {"key": "crm_contact:9", "token": first}),
        ("/effects", {"idempotency_key": "refund-1", "kind": "payments.refund", "request": {"amount": "5"},
                      "lease_key": "crm_contact:9", "token": first}),
    ):  # fmt: skip
        stale = post(agent, path, body)
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_token", (
            path,
            stale.content,
        )
    assert not SideEffect.objects.exists()  # the stale proposal recorded nothing
    assert post(agent, "/leases/release", {"key": "crm_contact:9", "token": second}).status_code == 204
    # The engine's own keys are not an outside agent's to take.
    reserved = post(agent, "/leases/acquire", {"key": "step:1", "holder": "x"})
    assert reserved.status_code == 400 and reserved.json()["error"]["code"] == "reserved_key"


@pytest.mark.django_db(transaction=True)
def test_an_effect_is_proposed_then_reported_and_a_retry_is_answered_from_the_ledger(
    acme: Tenant, globex: Tenant, acme_operator: User, globex_operator: User
) -> None:
    agent = bearer_client(acme_operator)
    lease = post(agent, "/leases/acquire", {"key": "payment:77", "holder": "billing-agent"}).json()
    proposal = {"idempotency_key": "refund-77", "kind": "payments.refund", "request": {"amount": "150.00"},
                "lease_key": "payment:77", "token": lease["token"]}  # fmt: skip
    proposed = post(agent, "/effects", proposal)
    assert proposed.status_code == 201 and proposed.json()["status"] == "proposed"
    # Asked again before the outcome: its proposer's lease is live, so it is in flight.
    again = post(agent, "/effects", proposal)
    assert again.status_code == 409 and again.json()["error"]["code"] == "effect_in_flight"
    report = {"idempotency_key": "refund-77", "outcome": "committed", "result": {"refund_id": "ref_1"},
              "external_ref": "ref_1", "token": lease["token"]}  # fmt: skip
    wrong_token = post(agent, "/effects/outcome", {**report, "token": lease["token"] + 1})
    assert wrong_token.status_code == 409
    assert post(agent, "/effects/outcome", report).json()["status"] == "committed"
    assert post(agent, "/effects/outcome", report).status_code == 409  # once
    replay = post(agent, "/effects", proposal)
    assert replay.status_code == 200
    assert replay.json() == {"idempotency_key": "refund-77", "status": "committed", "replayed": True,
                             "result": {"refund_id": "ref_1"}, "external_ref": "ref_1"}  # fmt: skip
    nan = agent.post("/api/v1/effects", data='{"idempotency_key": "n", "kind": "k", "request": {"x": NaN}}',
                     content_type="application/json")  # fmt: skip
    assert nan.status_code == 422 and "request.x" in nan.json()["error"]["details"]["fields"], nan.content
    reused = post(agent, "/effects", {**proposal, "request": {"amount": "9.00"}})
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    # Another tenant's same key is its own record.
    other = post(bearer_client(globex_operator), "/effects", {**proposal, "lease_key": "", "token": None})
    assert other.status_code == 201 and other.json()["status"] == "proposed"
    assert SideEffect.objects.filter(tenant=acme, status=EffectStatus.COMMITTED).count() == 1
    # A failed effect may be proposed again (by one caller): it did not happen.
    post(agent, "/effects", {"idempotency_key": "mail-1", "kind": "mail.send", "request": {}})
    assert post(agent, "/effects/outcome", {"idempotency_key": "mail-1", "outcome": "failed",
                                            "error": "smtp down"}).json()["status"] == "failed"  # fmt: skip
    assert (
        post(agent, "/effects", {"idempotency_key": "mail-1", "kind": "mail.send", "request": {}}).status_code
        == 201
    )
    # And the system still does its job: a normal run finishes.
    run = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    pump_until(lambda: Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED)


AGENT = textwrap.dedent(
    """
    import json, sys, time
    from runwarden.client import Runwarden, StaleToken

    rw = Runwarden(sys.argv[1], token=sys.argv[2], tenant="acme")
    seen = {}
    lease = rw.acquire("crm_contact:5", holder="outside-agent", ttl=1.0)
    calls = []
    seen["first"] = rw.effect("note-5", "crm.note", lambda: calls.append(1) or {"note": 1},
                              request={"text": "hello"}, lease=lease)
    seen["again"] = rw.effect("note-5", "crm.note", lambda: calls.append(1) or {"note": 2},
                              request={"text": "hello"}, lease=lease)
    time.sleep(1.5)  # the lease runs out
    for name, write in (("renew", lambda: rw.renew(lease)),
                        ("effect", lambda: rw.effect("note-6", "crm.note", lambda: calls.append(1),
                                                     request={}, lease=lease))):
        try:
            write()
            seen[name] = "accepted"
        except StaleToken as refused:
            seen[name] = refused.code
    fresh = rw.acquire("crm_contact:5", holder="outside-agent", ttl=5)
    seen["newer_token"] = fresh.token > lease.token
    rw.release(fresh)
    seen["calls"] = len(calls)
    print(json.dumps(seen))
    """
)


@pytest.mark.timeout(120)
@pytest.mark.django_db(transaction=True)
def test_an_outside_process_using_only_http_is_fenced_out_once_its_lease_expires(
    acme: Tenant, acme_operator: User, tmp_path: Path
) -> None:
    token = services.api_token_issue(user=acme_operator, name="outside agent")
    env = base_env(DEBUG="1", DATABASE_URL=database_url())
    with console_server(env, tmp_path / "serve.log") as url:
        script = tmp_path / "agent.py"
        script.write_text(AGENT)
        agent_env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}  # the client alone, no Django
        done = subprocess.run([sys.executable, str(script), url, token], env=agent_env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {
        "first": {"note": 1},
        "again": {"note": 1},  # answered from the ledger: its function did not run again
        "renew": "stale_token",
        "effect": "stale_token",
        "newer_token": True,
        "calls": 1,
    }
    effect = SideEffect.objects.get(tenant=acme)
    assert (effect.status, effect.result, effect.run_id) == (EffectStatus.COMMITTED, {"note": 1}, None)


def ask(client: Client, **body: Any) -> Any:
    return post(
        client, "/outside/approvals", {"kind": "payments.refund", "action": {"amount": "150.00"}, **body}
    )


@pytest.mark.django_db(transaction=True)
def test_an_outside_agent_asks_a_human_and_long_polls_the_decision_an_edit_included(
    acme: Tenant, acme_operator: User, acme_admin: User, globex_operator: User
) -> None:
    agent = bearer_client(acme_operator)
    asked = ask(agent, agent="billing-bot", idempotency_key="refund-ticket-1")
    assert asked.status_code == 201, asked.content
    decision_id = asked.json()["id"]
    assert asked.json()["status"] == "pending"
    assert ask(agent, agent="billing-bot", idempotency_key="refund-ticket-1").json()["id"] == decision_id
    pump()  # a worker opens the request: it is in the inbox
    request = ApprovalRequest.objects.get(run_id=decision_id, status="pending")
    assert agent.get(f"/api/v1/outside/approvals/{decision_id}").json()["approval_id"] == request.pk
    assert bearer_client(globex_operator).get(f"/api/v1/outside/approvals/{decision_id}").status_code == 404

    # An admin lowers the amount; the agent's own user may not approve what it proposed.
    artifact = Artifact.objects.get(pk=request.artifact_id)
    approvals.artifact_edit(
        artifact=artifact, user=acme_admin, expected_version=1, content={"amount": "90.00"}
    )
    newest = ApprovalRequest.objects.get(run_id=decision_id, status="pending")
    with pytest.raises(approvals.DecisionForbidden):
        approvals.approval_decide(request=newest, user=acme_operator, decision="approve", expected_version=1)
    other = make_member("second-operator", acme, "operator")

    def decide_soon() -> None:
        time.sleep(0.5)
        try:
            approvals.approval_decide(request=newest, user=other, decision="approve", expected_version=1)
            pump()  # a worker records the approved action: the agent is told then
        finally:
            connections.close_all()

    deciding = threading.Thread(target=decide_soon)
    deciding.start()
    waited = agent.get(f"/api/v1/outside/approvals/{decision_id}?wait=20").json()
    deciding.join()
    assert waited["status"] == "approved" and waited["action"] == {"amount": "90.00"}, waited
    assert waited["decided_by"] == "second-operator"
    assert OutboxMessage.objects.filter(kind="approval_decided", payload__run_id=decision_id).exists()
    pump_until(lambda: Run.objects.get(pk=decision_id).status == RunStatus.SUCCEEDED)

    rejected = ask(agent).json()["id"]
    pump()
    approvals.approval_decide(
        request=ApprovalRequest.objects.get(run_id=rejected, status="pending"),
        user=other, decision="reject", expected_version=1, comment="not this one",
    )  # fmt: skip
    answer = agent.get(f"/api/v1/outside/approvals/{rejected}?wait=5").json()
    assert (answer["status"], answer["reason"], answer["action"]) == ("rejected", "not this one", None)
    bad = ask(agent, kind="no spaces allowed")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"


@pytest.mark.django_db(transaction=True)
def test_the_longest_holder_the_schema_allows_fits_the_lease_row(acme: Tenant, acme_operator: User) -> None:
    agent = bearer_client(acme_operator)
    taken = post(agent, "/leases/acquire", {"key": "k" * 200, "holder": "h" * 192})
    assert taken.status_code == 201, taken.content
    too_long = post(agent, "/leases/acquire", {"key": "k2", "holder": "h" * 193})
    assert too_long.status_code == 422
