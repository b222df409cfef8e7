"""Environments and connections (issue 9): a run's environment is explicit, its connections
are bound at start and frozen, and it can never reach another tenant's or environment's."""

from __future__ import annotations

import pytest
from django.test import Client

from core import services
from core.connections import ConnectionInvalid, connection_add, connection_for_run, connection_update
from core.models import Connection, Event, Tenant, User
from demo.models import SandboxCall
from runs.models import Run, SideEffect
from runs.services import run_start
from tests.approvals.helpers import pump
from tests.conftest import bearer_client, client_for

CRM_RUN = {"workflow": "demo.crm_update", "input": {"contact_id": 1, "changes": {"stage": "won"}}}


def token_client(user: User, environment: str) -> Client:
    token = services.api_token_issue(user=user, name="t", environment=environment)
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def connection(tenant: Tenant, environment: str, provider: str = "crm") -> Connection:
    return Connection.objects.get(tenant=tenant, environment=environment, provider=provider, is_default=True)


@pytest.mark.django_db(transaction=True)
def test_a_staging_token_runs_on_staging_connections_only(sandbox_acme: Tenant, acme_operator: User) -> None:
    staging = token_client(acme_operator, "staging")
    production = token_client(acme_operator, "production")
    ids = []
    for client in (staging, production, staging):
        response = client.post("/api/v1/runs", CRM_RUN, content_type="application/json")
        assert response.status_code == 201, response.content
        ids.append(response.json()["id"])
    explicit = production.post(
        "/api/v1/runs", {**CRM_RUN, "environment": "staging"}, content_type="application/json"
    )
    assert explicit.status_code == 201
    ids.append(explicit.json()["id"])
    pump(rounds=20)
    runs = Run.objects.in_bulk(ids)
    assert [runs[i].environment for i in ids] == ["staging", "production", "staging", "staging"]
    assert all(runs[i].status == "succeeded" for i in ids)
    for run_id in ids:
        run = runs[run_id]
        expected = connection(sandbox_acme, run.environment)
        assert run.connections["crm"] == {"id": expected.pk, "name": expected.name}
        calls = SandboxCall.objects.filter(run_id=run_id)
        assert calls.exists()
        assert set(calls.values_list("connection_id", flat=True)) == {expected.pk}, (
            "each call went where its run was bound"
        )
        effect = SideEffect.objects.get(run_id=run_id)
        assert effect.context == {
            "correlation_id": run.correlation_id,
            "actor": run.actor,
            "environment": run.environment,
            "session_key": "",
            "workflow_version": run.workflow_version,
            "connections": {"crm": expected.name},
            "attempt": 1,
        }, "the ledger row carries the run's contract"
        events = Event.objects.filter(subject=f"run:{run_id}")
        assert events.count() >= 2
        for event in events:
            assert event.payload["contract"] == {k: v for k, v in effect.context.items() if k != "attempt"}, (
                f"event {event.verb} carries the run's contract"
            )


@pytest.mark.django_db(transaction=True)
def test_an_unknown_environment_or_connection_is_a_422_and_stores_nothing(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    client = bearer_client(acme_operator)
    before = Run.objects.count()
    cases = [
        ({"environment": "prod"}, "environment"),
        ({"connections": {"crm": "nope"}}, "connections.crm"),
        ({"connections": {"crm": 5}}, "connections.crm"),
        ({"connections": {"crm\u0000": "x"}}, "connections.crm\u0000"),
        ({"connections": {"crm": "a\u0000b"}}, "connections.crm"),
        ({"connections": {"x" * 300: "y"}}, "connections." + "x" * 300),
    ]
    for extra, field in cases:
        response = client.post("/api/v1/runs", {**CRM_RUN, **extra}, content_type="application/json")
        assert response.status_code == 422, (extra, response.content)
        assert field in response.json()["error"]["details"]["fields"], response.json()
    assert Run.objects.count() == before
    with pytest.raises(ValueError, match="unknown environment"):
        services.api_token_issue(user=acme_operator, name="x", environment="prod")
    ok = client.post("/api/v1/runs", CRM_RUN, content_type="application/json")
    assert ok.status_code == 201, "the system still does its job"


@pytest.mark.django_db(transaction=True)
def test_a_named_connection_is_bound_and_a_default_changed_mid_run_moves_nothing(
    sandbox_acme: Tenant, acme_admin: User
) -> None:
    portal_b = connection_add(
        tenant=sandbox_acme, environment="production", provider="crm", name="portal-b", actor="t"
    )
    named = run_start(
        tenant=sandbox_acme,
        actor="t",
        connections={"crm": "portal-b"},
        **CRM_RUN,  # type: ignore[arg-type]
    ).run
    default = run_start(tenant=sandbox_acme, actor="t", **CRM_RUN).run  # type: ignore[arg-type]
    old_default = connection(sandbox_acme, "production")
    assert named.connections["crm"]["id"] == portal_b.pk
    assert default.connections["crm"]["id"] == old_default.pk
    connection_update(connection=portal_b, actor="admin", is_default=True)  # mid-run
    assert connection(sandbox_acme, "production").pk == portal_b.pk
    pump(rounds=20)
    assert set(SandboxCall.objects.filter(run_id=default.id).values_list("connection_id", flat=True)) == {
        old_default.pk
    }
    after = run_start(tenant=sandbox_acme, actor="t", **CRM_RUN).run  # type: ignore[arg-type]
    assert after.connections["crm"]["id"] == portal_b.pk, "new runs take the new default"
    assert Event.objects.filter(subject=f"connection:{portal_b.pk}", verb="connection_changed").exists()


@pytest.mark.django_db(transaction=True)
def test_a_run_can_never_reach_another_tenants_or_environments_connection(
    sandbox_acme: Tenant, globex: Tenant
) -> None:
    run = run_start(tenant=sandbox_acme, actor="t", **CRM_RUN).run  # type: ignore[arg-type]
    theirs = connection(globex, "production")
    staging = connection(sandbox_acme, "staging")
    for foreign in (theirs, staging):
        tampered = {"crm": {"id": foreign.pk, "name": foreign.name}}
        with pytest.raises(LookupError, match="gone"):
            connection_for_run(
                tenant_id=run.tenant_id, environment=run.environment, binding=tampered, provider="crm"
            )
    with pytest.raises(LookupError, match="no payments connection"):
        connection_for_run(
            tenant_id=run.tenant_id, environment=run.environment, binding={}, provider="payments"
        )


@pytest.mark.django_db(transaction=True)
def test_two_tenants_interleaved_on_one_worker_use_their_own_connections(
    sandbox_acme: Tenant, globex: Tenant
) -> None:
    from demo.models import SandboxContact

    for number in range(1, 4):
        SandboxContact.objects.get_or_create(
            tenant=globex, number=number, defaults={"name": f"G{number}", "email": f"g{number}@globex.test"}
        )
    runs = []
    for n in range(12):
        tenant = sandbox_acme if n % 2 else globex
        runs.append(
            run_start(
                tenant=tenant,
                actor="t",
                **{**CRM_RUN, "input": {"contact_id": 1 + n % 3, "changes": {"stage": f"s{n}"}}},
            ).run
        )  # type: ignore[arg-type]
    pump(rounds=60)
    own = {c.pk: c.tenant_id for c in Connection.objects.all()}
    for call in SandboxCall.objects.filter(run_id__in=[r.id for r in runs]):
        assert call.connection_id is not None
        assert own[call.connection_id] == call.tenant_id, "a call used another tenant's connection"


def test_secrets_are_stored_encrypted_and_never_shown(sandbox_acme: Tenant, acme_admin: User) -> None:
    client = bearer_client(acme_admin)
    created = client.post(
        "/api/v1/tenants/acme/connections",
        {"environment": "staging", "provider": "crm", "name": "portal-x", "secret": "s3cret-value"},
        content_type="application/json",
    )
    assert created.status_code == 201, created.content
    assert "s3cret-value" not in created.content.decode()
    assert created.json()["secret_source"] == "encrypted"
    stored = Connection.objects.get(pk=created.json()["id"])
    assert "s3cret-value" not in stored.secret_encrypted and stored.secret_encrypted
    bound = connection_for_run(
        tenant_id=sandbox_acme.pk,
        environment="staging",
        binding={"crm": {"id": stored.pk, "name": stored.name}},
        provider="crm",
    )
    assert bound.secret() == "s3cret-value" and "s3cret" not in repr(bound)
    listed = client.get("/api/v1/tenants/acme/connections")
    assert "s3cret-value" not in listed.content.decode()
    bad = client.post(
        "/api/v1/tenants/acme/connections",
        {"environment": "staging", "provider": "crm", "name": "portal-y", "secret_ref": "lowercase"},
        content_type="application/json",
    )
    assert bad.status_code == 422 and "secret_ref" in bad.json()["error"]["details"]["fields"]
    with pytest.raises(ConnectionInvalid):
        connection_add(tenant=sandbox_acme, environment="staging", provider="crm", name="portal-x", actor="t")


def test_only_admins_manage_connections(acme: Tenant, acme_operator: User, globex_admin: User) -> None:
    body = {"environment": "production", "provider": "crm", "name": "z"}
    assert bearer_client(acme_operator).get("/api/v1/tenants/acme/connections").status_code == 403
    assert (
        bearer_client(acme_operator)
        .post("/api/v1/tenants/acme/connections", body, content_type="application/json")
        .status_code
        == 403
    )
    assert bearer_client(globex_admin).get("/api/v1/tenants/acme/connections").status_code == 404
    assert not Connection.objects.filter(name="z").exists()


def test_bad_connection_input_is_refused_and_changes_nothing(acme: Tenant, acme_admin: User) -> None:
    client = bearer_client(acme_admin)
    before = Connection.objects.count()
    bodies = [
        {"environment": "staging", "provider": "crm", "name": "c1", "config": {"a": "x\u0000y"}},
        {"environment": "staging", "provider": "crm", "name": "c2", "config": {"k\u0000": 1}},
        {"environment": "staging", "provider": "crm", "name": "qa\n"},
        {"environment": "nowhere", "provider": "crm", "name": "c3"},
        {"environment": "staging", "provider": "crm", "name": "c4", "secret_ref": "env:X\n"},
        {"environment": "staging", "provider": "crm", "name": "c5", "secret": "a", "secret_ref": "env:A"},
    ]
    for body in bodies:
        response = client.post("/api/v1/tenants/acme/connections", body, content_type="application/json")
        assert response.status_code == 422, (body, response.content)
    assert Connection.objects.count() == before
    console = client_for(acme_admin)
    for garbage in ("abc", "1\u0000", "9" * 40, ""):
        response = console.post("/tenants/acme/connections/", {"action": "archive", "connection": garbage})
        assert response.status_code == 400, garbage
    assert not Connection.objects.filter(archived_at__isnull=False).exists()
    ok = client.post(
        "/api/v1/tenants/acme/connections",
        {"environment": "staging", "provider": "crm", "name": "fine", "config": {"portal": "eu-1"}},
        content_type="application/json",
    )
    assert ok.status_code == 201, "the system still does its job"
