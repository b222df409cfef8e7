"""Tenant administration: every cap of a tenant (enforced at admission), members and roles,
the audit log — in services, API and console, admins of that tenant only."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied
from django.db import connections
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core import services
from core.models import Event, Membership, Role, Tenant, TenantQuota, User
from runs.dispatch import dispatch_round, load_room
from runs.executor import step_execute
from runs.services import run_start
from tests.concurrency import held_per_scope, race_dispatchers, run_concurrently, sampled_peaks
from tests.conftest import bearer_client, client_for, make_member


def _put(client: Client, url: str, body: Any) -> Any:
    return client.put(url, data=json.dumps(body), content_type="application/json")


# --- caps -------------------------------------------------------------------------------------


def test_caps_merge_a_null_removes_one_and_each_change_is_audited(acme: Tenant, acme_admin: User) -> None:
    services.tenant_quota_update(
        tenant=acme, actor=acme_admin, changes={"caps": {"workflow": {"bench.noop": 2}, "lane": {"read": 3}}}
    )
    services.tenant_quota_update(
        tenant=acme, actor=acme_admin, changes={"caps": {"lane": {"read": None}, "tool": {"crm": 1}}}
    )
    quota = TenantQuota.objects.get(tenant=acme)
    assert quota.caps == {"workflow": {"bench.noop": 2}, "tool": {"crm": 1}}
    events = list(Event.objects.filter(tenant=acme, verb="quota_updated").order_by("pk"))
    assert len(events) == 2 and {e.actor for e in events} == {"admin"}
    assert events[1].payload["after"]["caps"] == quota.caps
    # Saving the same values again changes nothing and records nothing.
    services.tenant_quota_update(tenant=acme, actor=acme_admin, changes={"caps": {"tool": {"crm": 1}}})
    assert Event.objects.filter(tenant=acme, verb="quota_updated").count() == 2


@pytest.mark.parametrize(
    "caps, field",
    [
        ({"workflow": {"no.such.workflow": 2}}, "caps.workflow.no.such.workflow"),
        ({"lane": {"read": 0}}, "caps.lane.read"),
        ({"lane": {"read": True}}, "caps.lane.read"),
        ({"tool": {"crm": "2"}}, "caps.tool.crm"),
        ({"planet": {"mars": 1}}, "caps.planet"),
        ({"lane": [1]}, "caps.lane"),
    ],
)
def test_a_bad_cap_is_refused_with_its_field_and_changes_nothing(
    acme: Tenant, acme_admin: User, caps: dict[str, Any], field: str
) -> None:
    api = bearer_client(acme_admin)
    before = TenantQuota.objects.get(tenant=acme).caps
    response = _put(api, "/api/v1/tenants/acme/quota", {"caps": caps})
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and field in error["details"]["fields"], error
    assert TenantQuota.objects.get(tenant=acme).caps == before
    assert not Event.objects.filter(tenant=acme, verb="quota_updated").exists()


def test_the_quota_api_shows_and_sets_every_cap(acme: Tenant, acme_admin: User) -> None:
    api = bearer_client(acme_admin)
    response = _put(
        api, "/api/v1/tenants/acme/quota", {"weight": 3, "caps": {"workflow": {"demo.crm_update": 1}}}
    )
    assert response.status_code == 200, response.content
    body = api.get("/api/v1/tenants/acme/quota").json()
    assert body["weight"] == 3 and body["caps"] == {"workflow": {"demo.crm_update": 1}}
    assert "demo.crm_update" in body["cap_names"]["workflow"] and body["cap_names"]["lane"]
    assert body["platform_caps"]["lane"]["high_risk"] >= 1


def test_only_the_tenants_admins_see_or_change_its_quota(
    acme: Tenant, acme_operator: User, acme_reviewer: User, globex_admin: User
) -> None:
    for user, status in ((acme_operator, 403), (acme_reviewer, 403), (globex_admin, 404)):
        api = bearer_client(user)
        assert api.get("/api/v1/tenants/acme/quota").status_code == status
        assert _put(api, "/api/v1/tenants/acme/quota", {"weight": 9}).status_code == status
        assert client_for(user).get("/tenants/acme/quotas/").status_code == status
    assert TenantQuota.objects.get(tenant=acme).weight == 1


def test_the_quota_page_saves_a_workflow_cap_and_blank_removes_it(acme: Tenant, acme_admin: User) -> None:
    client = client_for(acme_admin)
    page = client.get("/tenants/acme/quotas/")
    assert page.status_code == 200 and b"cap__tool__crm" in page.content
    form = {"max_concurrent_steps": 10, "max_queue_depth": 1000, "weight": 1, "cap__workflow__bench.noop": 2}
    assert client.post("/tenants/acme/quotas/", form).status_code == 302
    assert TenantQuota.objects.get(tenant=acme).caps == {"workflow": {"bench.noop": 2}}
    form["cap__workflow__bench.noop"] = ""
    assert client.post("/tenants/acme/quotas/", form).status_code == 302
    assert TenantQuota.objects.get(tenant=acme).caps == {}
    form["cap__lane__read"] = -1
    assert client.post("/tenants/acme/quotas/", form).status_code == 400
    assert TenantQuota.objects.get(tenant=acme).caps == {}


@override_settings(
    RUNWARDEN_CAPS={"global": 50, "tenant_default": 10, "workflow": {}, "lane": {}, "tool": {}}
)
def test_a_tenant_workflow_cap_holds_back_that_workflow_only_and_a_lowered_cap_drains(
    acme: Tenant, globex: Tenant, acme_admin: User
) -> None:
    services.tenant_quota_update(
        tenant=acme, actor=acme_admin, changes={"caps": {"workflow": {"bench.noop": 2}}}
    )
    for tenant in (acme, globex):
        for _ in range(5):
            run_start(tenant=tenant, workflow="bench.noop", input={}, actor="t")
            run_start(tenant=tenant, workflow="test.busy_crm", input={"hold_seconds": 0}, actor="t")
    admitted = dispatch_round()
    held = load_room(timezone.now()).held
    assert held[f"tenant_workflow:{acme.pk}:bench.noop"] == 2
    assert held[f"tenant_workflow:{globex.pk}:bench.noop"] == 5, "another tenant is not held back"
    assert held[f"tenant_workflow:{acme.pk}:test.busy_crm"] == 5, "another workflow is not held back"
    # Lowered below what is admitted: nothing new until the holders are under the new cap.
    services.tenant_quota_update(
        tenant=acme, actor=acme_admin, changes={"caps": {"workflow": {"bench.noop": 1}}}
    )
    acme_noop = _acme_noop_steps(acme)
    holders = [a for a in admitted if a.step_id in acme_noop]
    assert len(holders) == 2
    step_execute(step_id=holders[0].step_id, token=holders[0].token)
    # One of the two still runs: 1 of a cap of 1 (with the old cap of 2 a waiter would go now).
    assert not [a for a in dispatch_round() if a.step_id in acme_noop]
    step_execute(step_id=holders[1].step_id, token=holders[1].token)
    assert len([a for a in dispatch_round() if a.step_id in acme_noop]) == 1


def _acme_noop_steps(acme: Tenant) -> set[int]:
    from runs.models import Step

    return set(Step.objects.filter(tenant=acme, run__workflow="bench.noop").values_list("pk", flat=True))


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_racing_dispatchers_never_exceed_a_tenants_lane_cap(acme: Tenant, globex: Tenant) -> None:
    admin = make_member("racing-admin", acme, Role.ADMIN)
    services.tenant_quota_update(tenant=acme, actor=admin, changes={"caps": {"lane": {"read": 2}}})
    ids = [
        run_start(tenant=tenant, workflow="bench.noop", input={}, actor="t").run.id
        for _ in range(30)
        for tenant in (acme, globex)
    ]
    caps = {"global": 20, "tenant_default": 10, "workflow": {}, "lane": {}, "tool": {}}
    # Another connection watches what is held against each cap while the dispatchers race.
    with override_settings(RUNWARDEN_CAPS=caps), sampled_peaks(held_per_scope, every=0.001) as peaks:
        results = race_dispatchers(ids, 6, timeout=230)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sum(results) == len(ids), "every step ran exactly once"
    assert peaks[f"tenant_lane:{acme.pk}:read"] <= 2, peaks
    assert peaks[f"tenant_lane:{acme.pk}:read"] == 2, "the race must press against the cap"
    assert peaks[f"tenant_lane:{globex.pk}:read"] > 2, "globex has no lane cap of its own"


# --- members ----------------------------------------------------------------------------------


def test_an_admin_adds_a_new_account_and_it_can_log_in_with_its_role(acme: Tenant, acme_admin: User) -> None:
    api = bearer_client(acme_admin)
    body = {"username": "dana", "role": "reviewer", "password": "a-long-enough-pass-9"}
    response = api.post("/api/v1/tenants/acme/members", data=body, content_type="application/json")
    assert response.status_code == 201, response.content
    assert response.json()["role"] == "reviewer"
    dana = Client()
    assert dana.login(username="dana", password="a-long-enough-pass-9")
    assert dana.get("/conflicts/").status_code == 200
    event = Event.objects.get(tenant=acme, verb="membership_added")
    assert event.actor == "admin" and event.payload == {"role": "reviewer", "account_created": True}


def test_adding_members_refuses_what_does_not_fit_and_changes_nothing(
    acme: Tenant, acme_admin: User, acme_operator: User, globex_operator: User
) -> None:
    api = bearer_client(acme_admin)
    url = "/api/v1/tenants/acme/members"
    cases = [
        ({"username": "newbie", "role": "operator"}, 422, "invalid_member"),  # no password
        ({"username": "newbie", "role": "operator", "password": "123"}, 422, "weak_password"),
        ({"username": "newbie", "role": "overlord", "password": "long-enough-pass-1"}, 422, "invalid_input"),
        ({"username": "operator", "role": "reviewer"}, 409, "already_member"),
        (
            {"username": "new\u0000bie", "role": "operator", "password": "long-enough-pass-1"},
            422,
            "invalid_input",
        ),
        ({"role": "operator"}, 422, "invalid_input"),
    ]
    users, members = User.objects.count(), Membership.objects.count()
    for body, status, code in cases:
        response = api.post(url, data=body, content_type="application/json")
        assert response.status_code == status, (body, response.content)
        assert response.json()["error"]["code"] == code, (body, response.content)
    assert (User.objects.count(), Membership.objects.count()) == (users, members)
    # Another tenant's member is not this admin's to take, and nothing about them is told.
    taken = api.post(
        url, data={"username": "globex-operator", "role": "operator"}, content_type="application/json"
    )
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "username_taken"
    assert "email" not in taken.content.decode()
    assert Membership.objects.filter(user=globex_operator).count() == 1
    # A username Django would refuse is refused here too.
    bad = api.post(
        url,
        data={"username": "a/b", "role": "operator", "password": "long-enough-pass-1"},
        content_type="application/json",
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_username"
    # An account that belongs to no tenant (removed earlier) can be given a role again.
    orphan = User.objects.create_user(username="former", password="x-long-enough-pass")
    back = api.post(url, data={"username": "former", "role": "reviewer"}, content_type="application/json")
    assert back.status_code == 201 and Membership.objects.get(user=orphan).role == "reviewer"


def test_role_changes_apply_at_once_and_the_last_admin_stays(
    acme: Tenant, acme_admin: User, acme_operator: User
) -> None:
    api = bearer_client(acme_admin)
    operator_client = client_for(acme_operator)
    assert operator_client.get("/tenants/acme/members/").status_code == 403
    response = api.patch(
        "/api/v1/tenants/acme/members/operator", data={"role": "admin"}, content_type="application/json"
    )
    assert response.status_code == 200 and response.json()["role"] == "admin"
    assert operator_client.get("/tenants/acme/members/").status_code == 200, "the new role applies at once"
    assert api.delete("/api/v1/tenants/acme/members/operator").status_code == 204
    assert operator_client.get("/runs/").status_code == 200  # logged in, but sees no acme runs
    assert operator_client.get("/tenants/acme/members/").status_code == 404
    last = api.patch(
        "/api/v1/tenants/acme/members/admin", data={"role": "operator"}, content_type="application/json"
    )
    assert last.status_code == 409 and last.json()["error"]["code"] == "last_admin"
    assert api.delete("/api/v1/tenants/acme/members/admin").status_code == 409
    assert Membership.objects.get(tenant=acme, user=acme_admin).role == Role.ADMIN
    assert api.delete("/api/v1/tenants/acme/members/nobody").status_code == 404
    verbs = list(
        Event.objects.filter(tenant=acme, subject="user:operator")
        .order_by("pk")
        .values_list("verb", flat=True)
    )
    assert verbs == ["membership_role_changed", "membership_revoked"]


def test_members_of_another_tenant_are_404_and_operators_403(
    acme: Tenant, acme_operator: User, acme_reviewer: User, globex_admin: User
) -> None:
    for user, status in ((acme_operator, 403), (acme_reviewer, 403), (globex_admin, 404)):
        api = bearer_client(user)
        assert api.get("/api/v1/tenants/acme/members").status_code == status
        body = {"username": "sneaky", "role": "admin", "password": "long-enough-pass-1"}
        assert (
            api.post("/api/v1/tenants/acme/members", data=body, content_type="application/json").status_code
            == status
        )
        assert api.delete("/api/v1/tenants/acme/members/operator").status_code == status
        assert (
            client_for(user)
            .post("/tenants/acme/members/", {"action": "remove", "username": "operator"})
            .status_code
            == status
        )
    assert Membership.objects.filter(tenant=acme).count() == 2
    assert not User.objects.filter(username="sneaky").exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_two_admins_demoting_each_other_at_once_leave_exactly_one_admin(acme: Tenant) -> None:
    for trial in range(15):
        ann = make_member(f"ann{trial}", acme, Role.ADMIN)
        bob = make_member(f"bob{trial}", acme, Role.ADMIN)
        Membership.objects.filter(tenant=acme, role=Role.ADMIN).exclude(user__in=[ann, bob]).update(
            role=Role.OPERATOR
        )

        def demote(i: int, pairs: list[tuple[User, User]] = [(ann, bob), (bob, ann)]) -> str:  # noqa: B006
            actor, target = pairs[i]
            try:
                services.membership_set_role(tenant=acme, actor=actor, user=target, role=Role.OPERATOR)
                return "demoted"
            except services.MembershipInvalid as refused:
                return refused.code
            except PermissionDenied:  # demoted first: no longer an admin, so not theirs to do
                return "forbidden"
            finally:
                connections.close_all()

        outcomes = run_concurrently(demote, 2)
        assert sorted(outcomes) in (["demoted", "last_admin"], ["demoted", "forbidden"]), (trial, outcomes)
        assert Membership.objects.filter(tenant=acme, role=Role.ADMIN).count() == 1


def test_the_members_page_adds_changes_and_removes(
    acme: Tenant, acme_admin: User, acme_operator: User
) -> None:
    client = client_for(acme_admin)
    page = client.get("/tenants/acme/members/")
    assert page.status_code == 200 and b'data-username="operator"' in page.content
    added = client.post(
        "/tenants/acme/members/",
        {"action": "add", "username": "erin", "role": "operator", "password": "long-enough-pass-1"},
    )
    assert added.status_code == 302
    assert (
        client.post(
            "/tenants/acme/members/", {"action": "set_role", "username": "erin", "role": "reviewer"}
        ).status_code
        == 302
    )
    assert Membership.objects.get(tenant=acme, user__username="erin").role == Role.REVIEWER
    assert client.post("/tenants/acme/members/", {"action": "remove", "username": "erin"}).status_code == 302
    assert not Membership.objects.filter(tenant=acme, user__username="erin").exists()
    refused = client.post("/tenants/acme/members/", {"action": "remove", "username": "admin"})
    assert refused.status_code == 400 and b"last admin" in refused.content
    bad = client.post(
        "/tenants/acme/members/", {"action": "set_role", "username": "operator", "role": "king"}
    )
    assert bad.status_code == 400
    assert Membership.objects.get(tenant=acme, user=acme_operator).role == Role.OPERATOR


def test_the_demo_admin_is_a_tenant_admin_not_a_django_superuser(db: None) -> None:
    from demo.seeding import seed_demo_tenants_and_users

    seed_demo_tenants_and_users(password="pw")
    admin = User.objects.get(username="admin")
    assert not admin.is_staff and not admin.is_superuser
    client = client_for(admin)
    assert client.get("/admin/").status_code == 302, "Django's admin is for platform staff only"
    assert client.get("/admin/core/tenant/").status_code == 302
    assert client.get("/tenants/acme/members/").status_code == 200
    assert client.get("/tenants/globex/members/").status_code == 404


# --- audit ------------------------------------------------------------------------------------


def test_the_audit_log_filters_and_pages_in_a_flat_number_of_queries(
    acme: Tenant, globex: Tenant, acme_admin: User
) -> None:
    for n in range(120):
        services.event_record(tenant=acme, subject=f"run:r{n}", verb="noted", actor=f"bot{n % 2}")
    services.event_record(tenant=globex, subject="run:secret", verb="noted", actor="bot0")
    services.tenant_quota_update(tenant=acme, actor=acme_admin, changes={"weight": 2})
    client = client_for(acme_admin)
    page = client.get("/tenants/acme/audit/?verb=quota_updated")
    assert page.status_code == 200 and b"quota_updated" in page.content and b"run:r1<" not in page.content
    api = bearer_client(acme_admin)
    first = api.get("/api/v1/tenants/acme/events?actor=bot1").json()
    assert len(first["items"]) == 50 and {e["actor"] for e in first["items"]} == {"bot1"}
    second = api.get(f"/api/v1/tenants/acme/events?actor=bot1&before={first['next_before']}").json()
    assert len(second["items"]) == 10 and second["next_before"] is None
    assert not [e for e in first["items"] + second["items"] if e["subject"] == "run:secret"]
    assert (
        api.get("/api/v1/tenants/acme/events?subject=run:r11")
        .json()["items"][0]["subject"]
        .startswith("run:r11")
    )
    assert api.get("/api/v1/tenants/acme/events?before=abc").status_code == 422
    counts = []
    for query in ("", "?actor=bot0", "?subject=run:&before=60"):
        with CaptureQueriesContext(connections["default"]) as captured:
            assert client.get(f"/tenants/acme/audit/{query}").status_code == 200
        counts.append(len(captured))
    assert len(set(counts)) == 1, counts
    assert client_for(acme_admin).get("/tenants/globex/audit/").status_code == 404


def test_quota_figures_must_be_whole_numbers(acme: Tenant, acme_admin: User) -> None:
    api = bearer_client(acme_admin)
    for body in ({"weight": True}, {"weight": "2"}, {"max_queue_depth": 1.5}, {"weight": 0}):
        response = _put(api, "/api/v1/tenants/acme/quota", body)
        assert response.status_code == 422, (body, response.content)
    assert TenantQuota.objects.get(tenant=acme).weight == 1
