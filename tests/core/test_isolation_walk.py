"""Isolation walk (issue 11, slice): every API route and console page that names a tenant's
object answers another tenant's user 404 — never 403, never the object — and changes nothing.
The walk checks it covers every parameterized route of the OpenAPI document, so a new route
cannot be added without being walked."""

from __future__ import annotations

import re
from typing import Any

import pytest

from approvals.models import ApprovalRequest, ConflictArtifact
from core import services
from core.models import ApiToken, Connection, Event, Membership, Role, Tenant, User
from runs.models import Run
from runs.services import TriggerPayloadMismatch, run_start
from tests.approvals.helpers import pending_request, pump
from tests.conftest import bearer_client, client_for, make_member

JSON = "application/json"


def acme_objects(acme: Tenant) -> dict[str, Any]:
    """One of each of acme's objects a route can name."""
    gated = run_start(
        tenant=acme, workflow="demo.lead_followup", input={"lead_id": 1, "contact_id": 1}, actor="t"
    ).run
    pump()
    approval = pending_request(gated)
    run_start(
        tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t", trigger_event_id="e-1"
    )
    with pytest.raises(TriggerPayloadMismatch):
        run_start(
            tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 2}, actor="t", trigger_event_id="e-1"
        )
    owner = User.objects.filter(username="admin").first() or make_member("admin", acme, Role.ADMIN)
    services.api_token_issue(user=owner, name="acme's")
    decision = run_start(
        tenant=acme, workflow="runwarden.outside_approval", input={"kind": "refund", "action": {}}, actor="t"
    ).run
    return {
        "token": ApiToken.objects.filter(user=owner).first(),
        "decision": decision,
        "run": gated,
        "approval": approval,
        "conflict": ConflictArtifact.objects.get(tenant=acme),
        "connection": Connection.objects.filter(tenant=acme).first(),
    }


def api_walk(o: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None, dict[str, str]]]:
    run, approval, conflict, connection = o["run"].id, o["approval"].pk, o["conflict"].pk, o["connection"].pk
    match = {"HTTP_IF_MATCH": '"1"'}
    return [
        ("get", f"/api/v1/runs/{run}", None, {}),
        ("get", f"/api/v1/outside/approvals/{o['decision'].id}", None, {}),
        ("post", f"/api/v1/runs/{run}/cancel", None, {}),
        ("post", f"/api/v1/runs/{run}/retry", None, {}),
        ("post", f"/api/v1/runs/{run}/replay", {}, {}),
        ("get", f"/api/v1/approvals/{approval}", None, {}),
        ("post", f"/api/v1/approvals/{approval}/approve", {}, match),
        ("post", f"/api/v1/approvals/{approval}/reject", {}, match),
        ("post", f"/api/v1/approvals/{approval}/request_changes", {}, match),
        ("post", f"/api/v1/approvals/{approval}/artifact", {"content": {"x": 1}}, match),
        ("get", f"/api/v1/conflicts/{conflict}", None, {}),
        ("post", f"/api/v1/conflicts/{conflict}/resolve", {"resolution": "acknowledge", "note": ""}, match),
        ("get", "/api/v1/tenants/acme/quota", None, {}),
        ("put", "/api/v1/tenants/acme/quota", {"weight": 5}, {}),
        ("get", "/api/v1/tenants/acme/environments", None, {}),
        ("post", "/api/v1/tenants/acme/environments", {"name": "qa"}, {}),
        ("get", "/api/v1/tenants/acme/connections", None, {}),
        (
            "post",
            "/api/v1/tenants/acme/connections",
            {"environment": "staging", "provider": "crm", "name": "x"},
            {},
        ),
        ("patch", f"/api/v1/tenants/acme/connections/{connection}", {"is_default": False}, {}),
        ("get", "/api/v1/tenants/acme/members", None, {}),
        (
            "post",
            "/api/v1/tenants/acme/members",
            {"username": "globex-operator", "role": "admin"},
            {},
        ),
        ("patch", "/api/v1/tenants/acme/members/admin", {"role": "operator"}, {}),
        ("delete", "/api/v1/tenants/acme/members/admin", None, {}),
        ("get", "/api/v1/tenants/acme/events", None, {}),
        ("delete", f"/api/v1/tokens/{o['token'].pk}", None, {}),
        (
            "post",
            "/api/v1/runs",
            {"workflow": "demo.enrich_lead", "input": {"lead_id": 1}, "tenant": "acme"},
            {},
        ),
    ]


def console_walk(o: dict[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    run, approval, conflict = o["run"].id, o["approval"].pk, o["conflict"].pk
    return [
        ("get", f"/runs/{run}/", {}),
        ("post", f"/runs/{run}/cancel/", {}),
        ("post", f"/runs/{run}/retry/", {}),
        ("post", f"/runs/{run}/replay/", {"input": ""}),
        ("get", "/sessions/acme/?key=anything", {}),
        ("post", f"/approvals/{approval}/decide/", {"decision": "approve", "version": "1"}),
        ("post", f"/approvals/{approval}/edit/", {"content": "{}", "version": "1"}),
        ("post", f"/conflicts/{conflict}/resolve/", {"resolution": "acknowledge", "version": "1"}),
        ("get", "/tenants/acme/quotas/", {}),
        (
            "post",
            "/tenants/acme/quotas/",
            {"weight": "5", "max_concurrent_steps": "5", "max_queue_depth": "5"},
        ),
        ("get", "/tenants/acme/connections/", {}),
        ("post", "/tenants/acme/connections/", {"action": "add_environment", "name": "qa"}),
        ("get", "/tenants/acme/members/", {}),
        ("post", "/tenants/acme/members/", {"action": "add", "username": "globex-operator", "role": "admin"}),
        ("post", "/tenants/acme/members/", {"action": "remove", "username": "admin"}),
        ("get", "/tenants/acme/audit/", {}),
    ]


def snapshot() -> tuple[Any, ...]:
    return (
        list(Run.objects.order_by("id").values_list("id", "status", "retries")),
        list(ApprovalRequest.objects.order_by("id").values_list("id", "status", "version")),
        list(ConflictArtifact.objects.order_by("id").values_list("id", "status", "version")),
        list(Connection.objects.order_by("id").values_list("id", "is_default", "archived_at")),
        list(Membership.objects.order_by("id").values_list("id", "role")),
        list(ApiToken.objects.filter(user__username="admin").order_by("id").values_list("id", "revoked_at")),
        Event.objects.count(),
    )


@pytest.mark.django_db(transaction=True)
def test_another_tenants_user_gets_404_everywhere_and_changes_nothing(
    sandbox_acme: Tenant, globex_operator: User, globex_admin: User
) -> None:
    objects = acme_objects(sandbox_acme)
    before = snapshot()
    for user in (globex_operator, globex_admin):
        api = bearer_client(user)
        for method, path, body, headers in api_walk(objects):
            kwargs: dict[str, Any] = {"content_type": JSON, **headers}
            if body is not None:
                kwargs["data"] = body
            response = getattr(api, method)(path, **kwargs)
            assert response.status_code == 404, (user.username, method, path, response.status_code)
            assert str(objects["run"].id) not in response.content.decode() or method != "get"
        console = client_for(user)
        for method, path, form in console_walk(objects):
            response = getattr(console, method)(path, form) if form else getattr(console, method)(path)
            assert response.status_code == 404, (user.username, method, path, response.status_code)
        for path in ("/api/v1/runs", "/api/v1/approvals", "/api/v1/conflicts", "/api/v1/leases"):
            listed = api.get(path).content.decode()
            assert objects["run"].id not in listed, f"{path} lists acme's run to {user.username}"
    assert snapshot() == before, "a refused request changed something"


def test_the_walk_covers_every_parameterized_api_route(acme: Tenant, acme_operator: User) -> None:
    document = bearer_client(acme_operator).get("/api/v1/openapi.json").json()
    routes = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
        if "{" in path
    }
    walked = set()
    placeholder = re.compile(r"/(run_[0-9A-Z]+|\d+|acme|admin)(?=/|$)")
    fake = {"run": type("R", (), {"id": "run_X"})(), "approval": type("A", (), {"pk": 1})()}
    fake |= {"conflict": type("C", (), {"pk": 2})(), "connection": type("N", (), {"pk": 3})()}
    fake |= {"token": type("T", (), {"pk": 4})(), "decision": type("D", (), {"id": "run_Y"})()}
    for method, path, _, _ in api_walk(fake):
        template = placeholder.sub("/{}", path.removeprefix("/api/v1"))
        walked.add((method, template))
    missing = {
        (method, path)
        for method, path in routes
        if (method, re.sub(r"\{[^}]+\}", "{}", path.removeprefix("/api/v1"))) not in walked
    }
    assert not missing, f"add these routes to the isolation walk: {sorted(missing)}"


def test_a_step_task_never_acts_on_another_tenants_step(acme: Tenant, globex: Tenant) -> None:
    """A step task carries a step id and the fencing token of that step's admission: a task
    naming another tenant's step with a token of its own tenant's admission does nothing."""
    from runs.dispatch import dispatch_round
    from runs.executor import step_execute
    from runs.models import Step

    mine = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    theirs = run_start(tenant=globex, workflow="bench.noop", input={}, actor="t").run
    admissions = {a.step_id: a for a in dispatch_round()}
    my_step = Step.objects.get(run=mine)
    their_step = Step.objects.get(run=theirs)
    assert {my_step.pk, their_step.pk} <= set(admissions)
    before = Step.objects.filter(pk=their_step.pk).values_list("status", "attempt", "lease_token").get()
    assert step_execute(step_id=their_step.pk, token=admissions[my_step.pk].token) == "not-ours"
    assert (
        Step.objects.filter(pk=their_step.pk).values_list("status", "attempt", "lease_token").get() == before
    )
    assert step_execute(step_id=my_step.pk, token=admissions[my_step.pk].token) == "succeeded"
