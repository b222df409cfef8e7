# ruff: noqa: E501  (the route tables read best one route per line)
"""Roles per route, table-driven, API and console: a member of the tenant without the role a
route needs gets 403 and nothing changes. (Another tenant's user gets 404: the isolation walk.)
Then bad input on every console form: a clear 4xx, never a 5xx, and nothing changes."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from core.models import Role, Tenant, User
from tests.conftest import bearer_client, make_member
from tests.core.test_isolation_walk import JSON, acme_objects, snapshot

# (method, path template, body, headers, roles allowed). {run} {approval} {conflict} {connection}
API_ROUTES: list[tuple[str, str, dict[str, Any] | None, dict[str, str], set[str]]] = [
    ("post", "/api/v1/conflicts/{conflict}/resolve", {"resolution": "acknowledge", "note": ""}, {"HTTP_IF_MATCH": '"1"'}, {"reviewer", "admin"}),
    ("post", "/api/v1/runs/{run}/cancel", None, {}, {"operator", "admin"}),
    ("post", "/api/v1/runs/{run}/retry", None, {}, {"operator", "admin"}),
    ("post", "/api/v1/runs/{run}/replay", {}, {}, {"operator", "admin"}),
    ("get", "/api/v1/tenants/acme/quota", None, {}, {"admin"}),
    ("put", "/api/v1/tenants/acme/quota", {"weight": 5}, {}, {"admin"}),
    ("get", "/api/v1/tenants/acme/members", None, {}, {"admin"}),
    ("post", "/api/v1/tenants/acme/members", {"username": "mallory", "role": "admin", "password": "long-enough-pass-1"}, {}, {"admin"}),
    ("patch", "/api/v1/tenants/acme/members/operator", {"role": "admin"}, {}, {"admin"}),
    ("delete", "/api/v1/tenants/acme/members/operator", None, {}, {"admin"}),
    ("get", "/api/v1/tenants/acme/events", None, {}, {"admin"}),
    ("get", "/api/v1/tenants/acme/connections", None, {}, {"admin"}),
    ("post", "/api/v1/tenants/acme/connections", {"environment": "staging", "provider": "crm", "name": "x"}, {}, {"admin"}),
    ("patch", "/api/v1/tenants/acme/connections/{connection}", {"is_default": False}, {}, {"admin"}),
    ("get", "/api/v1/tenants/acme/environments", None, {}, {"admin"}),
    ("post", "/api/v1/tenants/acme/environments", {"name": "qa"}, {}, {"admin"}),
]  # fmt: skip

CONSOLE_ROUTES: list[tuple[str, dict[str, str], set[str]]] = [
    ("/conflicts/{conflict}/resolve/", {"resolution": "acknowledge", "version": "1"}, {"reviewer", "admin"}),
    ("/runs/{run}/cancel/", {}, {"operator", "admin"}),
    ("/runs/{run}/retry/", {}, {"operator", "admin"}),
    ("/runs/{run}/replay/", {"input": ""}, {"operator", "admin"}),
    ("/tenants/acme/quotas/", {"weight": "5", "max_concurrent_steps": "5", "max_queue_depth": "5"}, {"admin"}),
    ("/tenants/acme/members/", {"action": "remove", "username": "reviewer"}, {"admin"}),
    ("/tenants/acme/connections/", {"action": "add_environment", "name": "qa"}, {"admin"}),
]  # fmt: skip


def _fill(template: str, o: dict[str, Any]) -> str:
    return template.format(
        run=o["run"].id, approval=o["approval"].pk, conflict=o["conflict"].pk, connection=o["connection"].pk
    )


@pytest.mark.django_db(transaction=True)
def test_members_without_the_role_get_403_on_every_route_and_nothing_changes(sandbox_acme: Tenant) -> None:
    objects = acme_objects(sandbox_acme)
    members = {
        "operator": make_member("operator", sandbox_acme, Role.OPERATOR),
        "reviewer": make_member("reviewer", sandbox_acme, Role.REVIEWER),
    }
    before = snapshot()
    checked = 0
    for role, user in members.items():
        api = bearer_client(user)
        for method, template, body, headers, allowed in API_ROUTES:
            if role in allowed:
                continue
            kwargs: dict[str, Any] = {"content_type": JSON, **headers}
            if body is not None:
                kwargs["data"] = body
            response = getattr(api, method)(_fill(template, objects), **kwargs)
            assert response.status_code == 403, (role, method, template, response.content)
            assert response.json()["error"]["code"] == "forbidden"
            checked += 1
        console = Client(HTTP_HX_REQUEST="true")  # as the console's htmx forms send them
        console.force_login(user)
        for template, form, allowed in CONSOLE_ROUTES:
            if role in allowed:
                continue
            response = console.post(_fill(template, objects), form)
            assert response.status_code == 403, (role, template, response.status_code)
            checked += 1
    assert checked >= 30
    assert snapshot() == before, "a refused request changed something"


def test_the_route_table_names_every_tenant_admin_and_conflict_write_route(
    acme: Tenant, acme_operator: User
) -> None:
    """A new tenant-admin route or conflict write must be added to API_ROUTES above."""
    document = bearer_client(acme_operator).get("/api/v1/openapi.json").json()
    guarded = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
        if path.startswith("/api/v1/tenants/") or (path.startswith("/api/v1/conflicts/{") and method != "get")
    }
    replacements = {
        "/acme/": "/{slug}/",
        "/operator": "/{username}",
        "{conflict}": "{conflict_id}",
        "{connection}": "{connection_id}",
        "{run}": "{run_id}",
    }
    tabled = set()
    for method, template, *_ in API_ROUTES:
        for old, new in replacements.items():
            template = template.replace(old, new)
        tabled.add((method, template))
    missing = guarded - tabled
    assert not missing, f"add these routes to API_ROUTES: {sorted(missing)}"


# --- bad input on console forms ----------------------------------------------------------------


NASTY = [
    "",
    "\x00",
    "x" * 5000,
    "-1",
    "1e309",
    "[]",
    "{",
    "<script>alert(1)</script>",
    "99999999999999999999999",
]


@pytest.mark.django_db(transaction=True)
def test_every_console_form_refuses_bad_input_with_a_4xx_and_changes_nothing(sandbox_acme: Tenant) -> None:
    objects = acme_objects(sandbox_acme)
    admin = make_member("admin2", sandbox_acme, Role.ADMIN)
    console = Client(HTTP_HX_REQUEST="true")
    console.force_login(admin)
    forms = {
        f"/runs/{objects['run'].id}/replay/": ["input", "connections"],
        f"/approvals/{objects['approval'].pk}/decide/": ["decision", "version", "comment"],
        f"/approvals/{objects['approval'].pk}/edit/": ["content", "version", "field:subject"],
        f"/conflicts/{objects['conflict'].pk}/resolve/": ["resolution", "version", "note"],
        "/tenants/acme/quotas/": ["weight", "max_concurrent_steps", "max_queue_depth", "cap__lane__read"],
        "/tenants/acme/members/": ["action", "username", "role", "password"],
        "/tenants/acme/connections/": ["action", "name", "environment", "provider", "connection"],
        "/account/tokens/": ["action", "days", "environment", "token"],
    }
    before = snapshot()
    for path, fields in forms.items():
        for value in NASTY:
            if value == "" and path.endswith("/replay/"):
                continue  # an empty input means "the same input": a valid replay
            response = console.post(path, dict.fromkeys(fields, value))
            assert 400 <= response.status_code < 500, (path, value[:20], response.status_code)
            assert b"<script>alert(1)</script>" not in response.content, "echoed unescaped"
    refused = [
        "/runs/?cursor=%00",
        "/runs/?cursor=" + "z" * 3000,
        "/runs/?cursor=run_'--",
        "/runs/?workflow=%00",
        "/tenants/acme/audit/?before=-1&verb=%00",
        "/sessions/acme/?key=%00",
    ]
    for path in refused:
        assert console.get(path).status_code == 400, path
    for path in ("/tenants/acme/audit/?before=%C2%B2", "/tenants/acme/audit/?before=99999999999999999999999"):
        assert console.get(path).status_code == 200, path  # a cursor it cannot read is ignored
    assert console.get("/runs/%00/").status_code == 404
    api = bearer_client(admin)
    for path in (
        "/api/v1/runs?cursor=%00",
        "/api/v1/runs?cursor=nope",
        "/api/v1/runs?workflow=%00",
        "/api/v1/tenants/acme/members/%00",
        "/api/v1/tenants/%00/quota",
    ):
        response = api.get(path)
        assert response.status_code in (400, 404, 422) and "error" in response.json(), path
    assert api.delete("/api/v1/tenants/acme/members/%00").status_code == 404
    multipart = api.post("/api/v1/tenants/acme/environments", data={"name": "qa"})  # a form, not JSON
    assert 400 <= multipart.status_code < 500, multipart.content
    assert snapshot() == before, "a refused form changed something"
