from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from core.leases import lease_acquire
from core.models import Membership, Role, Tenant, TenantQuota, User
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_start
from tests.conftest import bearer_client, post_run

pytestmark = pytest.mark.django_db


def test_starting_a_run_answers_201_with_its_steps(acme_operator: User) -> None:
    response = post_run(
        bearer_client(acme_operator), {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"].startswith("run_")
    assert (body["status"], body["workflow"], body["tenant"]) == ("pending", "demo.enrich_lead", "acme")
    assert [(s["key"], s["status"], s["lane"]) for s in body["steps"]] == [
        ("fetch_lead", "ready", "read"),
        ("summarize", "pending", "read"),
        ("draft_note", "pending", "draft"),
    ]
    assert body["effects"] == []
    assert "Idempotent-Replayed" not in response


def test_a_repeated_idempotency_key_replays_and_another_payload_conflicts(acme_operator: User) -> None:
    client = bearer_client(acme_operator)
    first = post_run(
        client, {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}}, **{"Idempotency-Key": "evt-1"}
    )
    again = post_run(
        client, {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}}, **{"Idempotency-Key": "evt-1"}
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = post_run(
        client, {"workflow": "demo.enrich_lead", "input": {"lead_id": 8}}, **{"Idempotency-Key": "evt-1"}
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.json()["error"]["details"]["run_id"] == first.json()["id"]
    assert Run.objects.count() == 1


@pytest.mark.django_db(transaction=True)  # outside a transaction: a start is one round trip
def test_a_known_delivery_is_answered_from_the_record_on_the_one_round_trip_path_even_over_quota(
    acme: Tenant, acme_operator: User
) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_queue_depth=3)
    client = bearer_client(acme_operator)
    lead = {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}}
    assert post_run(client, {**lead, "input": {"lead_id": 1}}).status_code == 201  # the tenant's first
    first = post_run(client, lead, **{"Idempotency-Key": "evt-1"})
    assert first.status_code == 201
    again = post_run(client, lead, **{"Idempotency-Key": "evt-1"})  # refused by the unique constraint
    assert (again.status_code, again["Idempotent-Replayed"]) == (200, "true")
    assert again.json()["id"] == first.json()["id"]
    other = post_run(client, {**lead, "input": {"lead_id": 8}}, **{"Idempotency-Key": "evt-1"})
    assert other.status_code == 409
    assert post_run(client, {**lead, "input": {"lead_id": 2}}).status_code == 201  # the quota is full
    # A known delivery is answered from the record; a new one is refused.
    assert post_run(client, lead, **{"Idempotency-Key": "evt-1"}).status_code == 200
    assert post_run(client, lead, **{"Idempotency-Key": "evt-2"}).status_code == 429
    assert Run.objects.count() == 3
    assert Run.objects.filter(trigger_event_id="evt-1").count() == 1


def test_over_the_queue_depth_quota_answers_429_with_retry_after(acme: Tenant, acme_operator: User) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_queue_depth=2)
    client = bearer_client(acme_operator)
    for n in range(1, 3):
        assert post_run(client, {"workflow": "demo.enrich_lead", "input": {"lead_id": n}}).status_code == 201
    refused = post_run(client, {"workflow": "demo.enrich_lead", "input": {"lead_id": 9}})
    assert refused.status_code == 429
    assert refused["Retry-After"] == "5"
    assert refused.json()["error"]["code"] == "queue_depth_exceeded"
    assert Run.objects.count() == 2
    # Finished runs no longer count.
    Run.objects.update(status=RunStatus.SUCCEEDED)
    assert post_run(client, {"workflow": "demo.enrich_lead", "input": {"lead_id": 9}}).status_code == 201


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"workflow": "demo.nope", "input": {}}, 400, "unknown_workflow"),
        ({"workflow": "demo.enrich_lead", "input": [1, 2]}, 422, "invalid_input"),
        ({"input": {}}, 422, "invalid_input"),
        ({"workflow": "demo.enrich_lead", "tenant": "globex"}, 404, "not_found"),
    ],
)
def test_bad_run_requests_are_refused_and_start_nothing(
    acme_operator: User, globex: Tenant, body: dict, status: int, code: str
) -> None:
    response = post_run(bearer_client(acme_operator), body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert not Run.objects.exists()


def test_a_reviewer_cannot_start_runs(acme_reviewer: User) -> None:
    response = post_run(bearer_client(acme_reviewer), {"workflow": "demo.enrich_lead", "input": {}})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "tenant_required"


def test_a_member_of_two_tenants_names_one(acme: Tenant, globex: Tenant, acme_admin: User) -> None:
    Membership.objects.create(user=acme_admin, tenant=globex, role=Role.OPERATOR)
    client = bearer_client(acme_admin)
    assert post_run(client, {"workflow": "demo.enrich_lead"}).json()["error"]["code"] == "tenant_required"
    response = post_run(client, {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}, "tenant": "globex"})
    assert response.status_code == 201
    assert response.json()["tenant"] == "globex"


def test_runs_are_listed_filtered_and_paged_by_cursor(
    acme: Tenant, globex: Tenant, acme_operator: User
) -> None:
    ids = [
        run_start(
            tenant=acme,
            workflow="demo.enrich_lead",
            input={"lead_id": n + 1},
            actor="t",
            correlation_id=f"c{n % 2}",
        ).run.id
        for n in range(5)
    ]
    run_start(tenant=globex, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t")
    client = bearer_client(acme_operator)
    first = client.get("/api/v1/runs?limit=2").json()
    assert [r["id"] for r in first["items"]] == ids[::-1][:2]
    second = client.get(f"/api/v1/runs?limit=2&cursor={first['next_cursor']}").json()
    third = client.get(f"/api/v1/runs?limit=2&cursor={second['next_cursor']}").json()
    assert [r["id"] for r in second["items"] + third["items"]] == ids[::-1][2:]
    assert third["next_cursor"] is None
    assert {r["id"] for r in client.get("/api/v1/runs?correlation_id=c0").json()["items"]} == {
        ids[0],
        ids[2],
        ids[4],
    }
    assert client.get("/api/v1/runs?workflow=demo.crm_update").json()["items"] == []
    assert client.get("/api/v1/runs?status=bogus").status_code == 400


def test_another_tenants_run_is_a_404(acme: Tenant, globex_operator: User) -> None:
    run = run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t").run
    client = bearer_client(globex_operator)
    assert client.get(f"/api/v1/runs/{run.id}").status_code == 404
    assert client.post(f"/api/v1/runs/{run.id}/cancel").status_code == 404
    assert client.get("/api/v1/runs").json()["items"] == []
    assert Run.objects.get(pk=run.id).status == RunStatus.PENDING


def test_cancelling_a_run_cancels_its_steps_and_releases_its_leases(
    acme: Tenant, acme_operator: User
) -> None:
    run = run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t").run
    step = run.steps.get(key="fetch_lead")
    grant = lease_acquire(
        tenant_id=acme.pk, key=f"step:{step.pk}", holder="w", ttl=30, metadata={"run_id": run.id}
    )
    assert grant is not None
    Step.objects.filter(pk=step.pk).update(status=StepStatus.RUNNING, lease_token=grant.token)
    client = bearer_client(acme_operator)
    assert client.get("/api/v1/leases").json()[0]["key"] == f"step:{step.pk}"
    response = client.post(f"/api/v1/runs/{run.id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert set(run.steps.values_list("status", flat=True)) == {"cancelled"}
    assert client.get("/api/v1/leases").json() == []
    again = client.post(f"/api/v1/runs/{run.id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "run_finished"


def test_a_runs_detail_shows_the_leases_it_holds_not_another_runs_on_the_same_key(
    acme: Tenant, acme_operator: User
) -> None:
    first = run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t").run
    second = run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 2}, actor="t").run
    own, theirs = (run.steps.get(key="fetch_lead") for run in (first, second))
    Step.objects.filter(pk__in=[own.pk, theirs.pk]).update(lock_keys=["crm_contact:1"])
    for step, key in ((own, f"step:{own.pk}"), (theirs, f"step:{theirs.pk}"), (theirs, "crm_contact:1")):
        lease_acquire(tenant_id=acme.pk, key=key, holder="w", ttl=30, metadata={"run_id": step.run_id})
    client = bearer_client(acme_operator)
    shown = {run.id: client.get(f"/api/v1/runs/{run.id}").json()["leases"] for run in (first, second)}
    # The entity key both steps name is the second run's now: the first run's detail leaves it out.
    assert [(lease["key"], lease["run_id"]) for lease in shown[first.id]] == [(f"step:{own.pk}", first.id)]
    assert [(lease["key"], lease["tenant"]) for lease in shown[second.id]] == [
        ("crm_contact:1", "acme"),
        (f"step:{theirs.pk}", "acme"),
    ]


def test_the_openapi_document_describes_the_runs_api(db: None) -> None:
    paths = Client().get("/api/v1/openapi.json").json()["paths"]
    assert {"/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/runs/{run_id}/cancel", "/api/v1/leases"} <= set(
        paths
    )


def test_start_run_command(acme: Tenant) -> None:
    out = StringIO()
    call_command("start_run", "demo.enrich_lead", "--tenant", "acme", "--input", '{"lead_id": 3}', stdout=out)
    assert out.getvalue().startswith("started: run_")
    with pytest.raises(CommandError, match="unknown workflow"):
        call_command("start_run", "demo.nope", "--tenant", "acme", stdout=StringIO())
    with pytest.raises(CommandError, match="not JSON"):
        call_command("start_run", "demo.enrich_lead", "--tenant", "acme", "--input", "{", stdout=StringIO())


def test_demo_traffic_starts_a_mix(acme: Tenant) -> None:
    out = StringIO()
    call_command("demo_traffic", "--tenant", "acme", "--runs", "12", stdout=out)
    assert "started 12 runs" in out.getvalue()
    assert Run.objects.filter(tenant=acme).count() == 12


@pytest.mark.django_db(transaction=True)
def test_racing_starts_never_exceed_the_queue_depth_quota(acme: Tenant) -> None:
    from runs.services import QuotaExceeded
    from tests.concurrency import run_concurrently

    TenantQuota.objects.filter(tenant=acme).update(max_queue_depth=5)
    for trial in range(3):
        Run.objects.filter(tenant=acme).update(status=RunStatus.SUCCEEDED)
        results = run_concurrently(
            lambda i, trial=trial: run_start(
                tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 20 * trial + i + 1}, actor="t"
            ),
            20,
        )
        unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, QuotaExceeded)]
        assert not unexpected, unexpected
        assert sum(not isinstance(r, BaseException) for r in results) == 5
        assert Run.objects.filter(tenant=acme, status=RunStatus.PENDING).count() == 5


@pytest.mark.django_db(transaction=True)
def test_a_run_started_in_one_round_trip_answers_with_what_it_wrote(acme_operator: User) -> None:
    client = bearer_client(acme_operator)
    post_run(client, {"workflow": "bench.five", "input": {}})  # the tenant's first start: counter rows
    with CaptureQueriesContext(connection) as queries:
        response = post_run(client, {"workflow": "bench.five", "input": {}})
    assert not [q["sql"] for q in queries if "runs_sideeffect" in q["sql"] or "core_lease" in q["sql"]]
    assert response.status_code == 201, response.content
    body = response.json()
    stored = client.get(f"/api/v1/runs/{body['id']}").json()
    assert [s["key"] for s in body["steps"]] == [f"noop{n}" for n in range(1, 6)]
    assert body == stored  # nothing ran yet (no worker here): the answer is what a read shows
