from __future__ import annotations

import json

import pytest
from django.test import Client

from core.models import Event, Tenant, TenantQuota, User
from tests.conftest import bearer_client, client_for

pytestmark = pytest.mark.django_db


def test_it_answers_404_for_another_tenants_quota_page(acme: Tenant, globex_admin: User) -> None:
    client = client_for(globex_admin)
    assert client.get("/tenants/acme/quotas/").status_code == 404
    assert client.get("/tenants/globex/quotas/").status_code == 200


def test_it_answers_404_for_another_tenants_quota_in_the_api(acme: Tenant, globex_admin: User) -> None:
    response = bearer_client(globex_admin).get("/api/v1/tenants/acme/quota")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_it_answers_404_for_an_unknown_tenant(globex_admin: User) -> None:
    assert bearer_client(globex_admin).get("/api/v1/tenants/nope/quota").status_code == 404


def test_it_answers_403_to_a_member_without_the_admin_role(acme_operator: User) -> None:
    client = client_for(acme_operator)
    assert client.get("/tenants/acme/quotas/").status_code == 403
    response = bearer_client(acme_operator).get("/api/v1/tenants/acme/quota")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_an_admin_updates_the_quota_over_the_api_and_it_is_audited(acme: Tenant, acme_admin: User) -> None:
    response = bearer_client(acme_admin).put(
        "/api/v1/tenants/acme/quota",
        data=json.dumps({"max_concurrent_steps": 3, "weight": 2}),
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert {k: body[k] for k in ("tenant", "max_concurrent_steps", "max_queue_depth", "weight", "caps")} == {
        "tenant": "acme",
        "max_concurrent_steps": 3,
        "max_queue_depth": 1000,
        "weight": 2,
        "caps": {},
    }
    quota = TenantQuota.objects.get(tenant=acme)
    assert (quota.max_concurrent_steps, quota.weight) == (3, 2)
    event = Event.objects.get(tenant=acme, verb="quota_updated")
    assert event.actor == "admin"
    assert event.payload["after"] == {"max_concurrent_steps": 3, "weight": 2}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"max_concurrent_steps": 0}, 422, "invalid_input"),
        ({"weight": "heavy"}, 422, "invalid_input"),
        ({}, 400, "invalid_request"),
        ({"max_queue_depth": -5}, 422, "invalid_input"),
    ],
)
def test_it_refuses_bad_quota_input_and_changes_nothing(
    acme: Tenant, acme_admin: User, body: dict, status: int, code: str
) -> None:
    response = bearer_client(acme_admin).put(
        "/api/v1/tenants/acme/quota", data=json.dumps(body), content_type="application/json"
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    quota = TenantQuota.objects.get(tenant=acme)
    assert (quota.max_concurrent_steps, quota.max_queue_depth, quota.weight) == (10, 1000, 1)
    assert not Event.objects.filter(verb="quota_updated").exists()


def test_the_quota_page_form_saves_and_rejects_bad_values(acme: Tenant, acme_admin: User) -> None:
    client = client_for(acme_admin)
    bad = client.post(
        "/tenants/acme/quotas/", {"max_concurrent_steps": 0, "max_queue_depth": 10, "weight": 1}
    )
    assert bad.status_code == 400
    assert TenantQuota.objects.get(tenant=acme).max_concurrent_steps == 10
    good = client.post(
        "/tenants/acme/quotas/", {"max_concurrent_steps": 4, "max_queue_depth": 10, "weight": 1}
    )
    assert good.status_code == 302
    assert TenantQuota.objects.get(tenant=acme).max_concurrent_steps == 4


def test_the_quota_page_enforces_csrf(acme: Tenant, acme_admin: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(acme_admin)
    response = client.post(
        "/tenants/acme/quotas/", {"max_concurrent_steps": 4, "max_queue_depth": 10, "weight": 1}
    )
    assert response.status_code == 403
    assert TenantQuota.objects.get(tenant=acme).max_concurrent_steps == 10


def test_session_auth_on_the_api_needs_csrf_for_writes(acme: Tenant, acme_admin: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(acme_admin)
    assert client.get("/api/v1/tenants/acme/quota").status_code == 200
    response = client.put(
        "/api/v1/tenants/acme/quota", data=json.dumps({"weight": 5}), content_type="application/json"
    )
    assert response.status_code in (401, 403)
    assert TenantQuota.objects.get(tenant=acme).weight == 1


def test_the_overview_lists_only_the_users_own_tenants(acme: Tenant, globex_operator: User) -> None:
    client = client_for(globex_operator)
    body = client.get("/").content.decode()
    assert "Globex Corporation" in body
    assert "Acme Corp" not in body


def test_pages_need_a_login(acme: Tenant) -> None:
    response = Client().get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
