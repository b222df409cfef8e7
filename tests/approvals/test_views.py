from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client
from pytest_django import DjangoAssertNumQueries

from approvals import services
from approvals.models import (
    ApprovalRequest,
    ApprovalStatus,
    ArtifactVersion,
    ConflictArtifact,
    ConflictStatus,
)
from core.models import Role, Tenant, User
from demo.sandbox import seed_sandbox
from runs.models import Step
from tests.approvals.helpers import RESUMED, waiting_followup
from tests.conftest import client_for, make_member

pytestmark = pytest.mark.django_db(transaction=True)

HTMX = {"HX-Request": "true"}


def cards(body: bytes) -> list[int]:
    return [int(i) for i in re.findall(r'<article id="approval-(\d+)"', body.decode())]


def decide(client: Client, req: ApprovalRequest, decision: str, version: int, **headers: Any) -> Any:
    return client.post(
        f"/approvals/{req.pk}/decide/",
        {"decision": decision, "expected_version": version},
        headers=headers or HTMX,
    )


def duplicate_payload_conflict(tenant: Tenant) -> ConflictArtifact:
    return services.record_conflict(
        "duplicate_trigger_payload",
        tenant_id=tenant.pk,
        target_key="trigger:evt-9",
        current={"input": {"lead_id": 1}},
        proposed={"input": {"lead_id": 2}},
    )


def test_it_lists_the_pending_requests_of_the_users_tenants_only(
    sandbox_acme: Tenant, globex: Tenant, acme_operator: User
) -> None:
    seed_sandbox(globex.pk)
    mine, foreign = waiting_followup(sandbox_acme), waiting_followup(globex)
    response = client_for(acme_operator).get("/approvals/")
    assert response.status_code == 200
    body = response.content.decode()
    assert cards(response.content) == [mine.pk]
    assert f'href="/runs/{mine.run_id}/"' in body
    assert foreign.run_id not in body
    for text in (
        "demo.lead_followup",
        "send_message",
        "artifact v1",
        "0/1 approvals",
        "Next steps for Company 7",
    ):
        assert text in body
    assert ">Approve</button>" in body and ">Reject</button>" in body and ">Request changes</button>" in body
    assert '<input type="hidden" name="expected_version" value="1">' in body


def test_it_filters_by_status_and_an_htmx_request_gets_only_the_list(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    decided, pending = waiting_followup(sandbox_acme), waiting_followup(sandbox_acme)
    services.approval_decide(request=decided, user=acme_operator, decision="reject", expected_version=1)
    client = client_for(acme_operator)
    assert cards(client.get("/approvals/").content) == [pending.pk]
    assert cards(client.get("/approvals/?status=rejected").content) == [decided.pk]
    assert cards(client.get("/approvals/?status=").content) == [pending.pk, decided.pk]
    fragment = client.get("/approvals/", headers=HTMX).content.decode()
    assert fragment.lstrip().startswith('<div id="approvals-list"')
    assert "<html" not in fragment and 'id="approvals-filter"' not in fragment
    # A live refresh keeps the cards on screen (now decided) beside the pending ones.
    refreshed = client.get(f"/approvals/?status=pending&shown={decided.pk}", headers=HTMX)
    assert cards(refreshed.content) == [pending.pk, decided.pk]
    assert "Rejected by <strong>operator</strong>" in refreshed.content.decode()


def test_it_answers_404_for_another_tenants_request(sandbox_acme: Tenant, globex_operator: User) -> None:
    req = waiting_followup(sandbox_acme)
    client = client_for(globex_operator)
    assert decide(client, req, "approve", 1).status_code == 404
    edit = {"expected_version": 1, "field:subject": "x", "field:body": "y"}
    assert client.post(f"/approvals/{req.pk}/edit/", edit).status_code == 404
    assert client.post("/approvals/999999/decide/", {"decision": "approve"}).status_code == 404
    assert ApprovalRequest.objects.get(pk=req.pk).version == 1


def test_it_approves_from_the_page_and_the_step_resumes(sandbox_acme: Tenant, acme_operator: User) -> None:
    req = waiting_followup(sandbox_acme)
    response = decide(client_for(acme_operator), req, "approve", 1)
    assert response.status_code == 200
    body = response.content.decode()
    assert body.lstrip().startswith(f'<article id="approval-{req.pk}"')
    assert "Approved version 1." in body
    assert "Approved by <strong>operator</strong>" in body
    assert ">Approve</button>" not in body
    req.refresh_from_db()
    assert (req.status, req.version) == (ApprovalStatus.APPROVED, 2)
    assert Step.objects.get(pk=req.step_id).status in RESUMED


def test_a_stale_second_approve_shows_the_winner_and_changes_nothing(
    sandbox_acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    req = waiting_followup(sandbox_acme)
    assert decide(client_for(acme_operator), req, "approve", 1).status_code == 200
    # It should be the second tab, still showing version 1 of the request.
    response = decide(client_for(acme_admin), req, "approve", 1)
    assert response.status_code == 409
    body = response.content.decode()
    assert re.search(r"Already approved by operator at \d\d:\d\d:\d\d UTC on version 1 — your decision", body)
    req.refresh_from_db()
    assert (req.status, req.version, req.decided_by) == (ApprovalStatus.APPROVED, 2, acme_operator)
    assert Step.objects.get(pk=req.step_id).status in RESUMED


def test_a_non_htmx_post_redirects_with_a_message(sandbox_acme: Tenant, acme_operator: User) -> None:
    req = waiting_followup(sandbox_acme)
    client = client_for(acme_operator)
    response = client.post(f"/approvals/{req.pk}/decide/", {"decision": "approve", "expected_version": 1})
    assert response.status_code == 302 and response["Location"] == "/approvals/"
    lost = client.post(
        f"/approvals/{req.pk}/decide/", {"decision": "reject", "expected_version": 1}, follow=True
    )
    assert "Already approved by operator" in lost.content.decode()
    assert ApprovalRequest.objects.get(pk=req.pk).status == ApprovalStatus.APPROVED


def test_self_approval_is_refused_with_the_reason(sandbox_acme: Tenant, acme_operator: User) -> None:
    req = waiting_followup(sandbox_acme, actor="operator")
    response = decide(client_for(acme_operator), req, "approve", 1)
    assert response.status_code == 403
    assert "you started this run or wrote this version" in response.content.decode()
    req.refresh_from_db()
    assert (req.status, req.version) == (ApprovalStatus.PENDING, 1)


def test_a_role_without_the_right_is_refused(sandbox_acme: Tenant, acme_reviewer: User) -> None:
    req = waiting_followup(sandbox_acme)
    response = decide(client_for(acme_reviewer), req, "approve", 1)
    assert response.status_code == 403
    assert "this approval needs one of the roles: operator" in response.content.decode()
    assert ApprovalRequest.objects.get(pk=req.pk).version == 1


def test_an_edit_writes_version_2_and_invalidates_the_request(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    req = waiting_followup(sandbox_acme)
    response = client_for(acme_operator).post(
        f"/approvals/{req.pk}/edit/",
        {"expected_version": 1, "field:subject": "Hello again", "field:body": "Line one\r\nLine two"},
        headers=HTMX,
    )
    assert response.status_code == 200
    version = ArtifactVersion.objects.get(artifact=req.artifact, number=2)
    assert version.content == {"subject": "Hello again", "body": "Line one\nLine two"}
    assert (version.author, version.based_on) == ("operator", 1)
    assert ApprovalRequest.objects.get(pk=req.pk).status == ApprovalStatus.INVALIDATED
    new = ApprovalRequest.objects.get(step=req.step, status=ApprovalStatus.PENDING)
    assert new.artifact_version == version
    body = response.content.decode()
    assert cards(response.content) == [new.pk]
    assert "Saved version 2" in body
    assert '<span class="diff-add">+  Hello again</span>' in body
    assert '<span class="diff-del">-  Next steps for Company 7</span>' in body


def test_a_stale_edit_is_refused_and_kept_for_a_reviewer(sandbox_acme: Tenant, acme_operator: User) -> None:
    req = waiting_followup(sandbox_acme)
    client = client_for(acme_operator)
    first = {"expected_version": 1, "field:subject": "First", "field:body": "one"}
    second = {"expected_version": 1, "field:subject": "Second", "field:body": "two"}
    assert client.post(f"/approvals/{req.pk}/edit/", first, headers=HTMX).status_code == 200
    response = client.post(f"/approvals/{req.pk}/edit/", second, headers=HTMX)
    assert response.status_code == 409
    conflict = ConflictArtifact.objects.get(kind="concurrent_edit")
    assert f"Your text is kept in conflict #{conflict.pk}" in response.content.decode()
    assert ArtifactVersion.objects.filter(artifact=req.artifact).count() == 2


def test_a_bad_json_edit_is_refused(sandbox_acme: Tenant, acme_operator: User) -> None:
    req = waiting_followup(sandbox_acme)
    response = client_for(acme_operator).post(
        f"/approvals/{req.pk}/edit/", {"expected_version": 1, "content_json": "{nope"}, headers=HTMX
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.content.decode()
    assert ArtifactVersion.objects.filter(artifact=req.artifact).count() == 1


def test_csrf_is_enforced(sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User) -> None:
    req = waiting_followup(sandbox_acme)
    conflict = duplicate_payload_conflict(sandbox_acme)
    for user, url, data in (
        (acme_operator, f"/approvals/{req.pk}/decide/", {"decision": "approve", "expected_version": 1}),
        (
            acme_reviewer,
            f"/conflicts/{conflict.pk}/resolve/",
            {"resolution": "acknowledge", "expected_version": 1},
        ),
    ):
        client = Client(enforce_csrf_checks=True)
        client.force_login(user)
        assert client.post(url, data, headers=HTMX).status_code == 403
    assert ApprovalRequest.objects.get(pk=req.pk).version == 1
    assert ConflictArtifact.objects.get(pk=conflict.pk).status == ConflictStatus.OPEN


def test_it_sends_anonymous_users_to_the_login_page(acme: Tenant) -> None:
    for url in ("/approvals/", "/conflicts/"):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_the_inbox_makes_a_bounded_number_of_queries(
    sandbox_acme: Tenant, acme_operator: User, django_assert_max_num_queries: DjangoAssertNumQueries
) -> None:
    requests = [waiting_followup(sandbox_acme) for _ in range(6)]
    client = client_for(acme_operator)
    client.get("/approvals/")  # warm the session
    # approval_detail looks up each artifact's approved baseline: one query per card, no more;
    # every page counts the nav's inbox badge, and the inbox lists recent notifications.
    with django_assert_max_num_queries(8 + len(requests)):
        response = client.get("/approvals/")
    assert sorted(cards(response.content)) == sorted(r.pk for r in requests)


# Conflicts


def test_the_conflicts_queue_lists_open_conflicts_of_the_users_tenants(
    acme: Tenant, globex: Tenant, acme_operator: User
) -> None:
    mine = duplicate_payload_conflict(acme)
    done = duplicate_payload_conflict(acme)
    ConflictArtifact.objects.filter(pk=done.pk).update(
        status=ConflictStatus.RESOLVED, resolution="acknowledge"
    )
    foreign = duplicate_payload_conflict(globex)
    client = client_for(acme_operator)
    body = client.get("/conflicts/").content.decode()
    assert f'id="conflict-{mine.pk}"' in body
    assert f'id="conflict-{done.pk}"' not in body and f'id="conflict-{foreign.pk}"' not in body
    assert "trigger:evt-9" in body
    # The card names its kind in words, the key on hover; the filter offers the kinds in words.
    kind = '<span class="kind"><span title="duplicate_trigger_payload">duplicate trigger payload</span>'
    assert kind in body
    assert '<option value="duplicate_trigger_payload">duplicate trigger payload</option>' in body
    assert "Resolving needs the reviewer role in acme." in body
    assert '<span class="diff-add">+    &quot;lead_id&quot;: 1</span>' in body
    resolved = client.get("/conflicts/?status=resolved&kind=duplicate_trigger_payload").content.decode()
    assert f'id="conflict-{done.pk}"' in resolved and f'id="conflict-{mine.pk}"' not in resolved
    assert f'id="conflict-{mine.pk}"' not in client.get("/conflicts/?kind=concurrent_edit").content.decode()


def test_a_reviewer_resolves_a_conflict(acme: Tenant, acme_reviewer: User) -> None:
    conflict = duplicate_payload_conflict(acme)
    client = client_for(acme_reviewer)
    page = client.get("/conflicts/").content.decode()
    assert '<option value="acknowledge">acknowledge</option>' in page
    assert 'name="external_ref"' not in page
    response = client.post(
        f"/conflicts/{conflict.pk}/resolve/",
        {"resolution": "acknowledge", "note": "sender fixed", "expected_version": 1},
        headers=HTMX,
    )
    assert response.status_code == 200
    assert "Resolved by <strong>reviewer</strong>" in response.content.decode()
    conflict.refresh_from_db()
    assert (conflict.status, conflict.resolved_by, conflict.note) == (
        "resolved",
        acme_reviewer,
        "sender fixed",
    )


def test_an_operator_may_not_resolve_and_nothing_changes(acme: Tenant, acme_operator: User) -> None:
    conflict = duplicate_payload_conflict(acme)
    response = client_for(acme_operator).post(
        f"/conflicts/{conflict.pk}/resolve/",
        {"resolution": "acknowledge", "expected_version": 1},
        headers=HTMX,
    )
    assert response.status_code == 403
    assert "This needs the reviewer role in acme." in response.content.decode()
    conflict.refresh_from_db()
    assert (conflict.status, conflict.version) == (ConflictStatus.OPEN, 1)


def test_another_tenants_conflict_is_404(acme: Tenant, globex: Tenant) -> None:
    conflict = duplicate_payload_conflict(acme)
    globex_reviewer = make_member("globex-reviewer", globex, Role.REVIEWER)
    response = client_for(globex_reviewer).post(
        f"/conflicts/{conflict.pk}/resolve/", {"resolution": "acknowledge", "expected_version": 1}
    )
    assert response.status_code == 404
    assert ConflictArtifact.objects.get(pk=conflict.pk).status == ConflictStatus.OPEN


def test_a_stale_resolve_shows_who_resolved_it_and_how(
    acme: Tenant, acme_reviewer: User, acme_admin: User
) -> None:
    conflict = duplicate_payload_conflict(acme)
    data = {"resolution": "acknowledge", "expected_version": 1}
    assert (
        client_for(acme_reviewer).post(f"/conflicts/{conflict.pk}/resolve/", data, headers=HTMX).status_code
        == 200
    )
    response = client_for(acme_admin).post(
        f"/conflicts/{conflict.pk}/resolve/", {**data, "note": "me too"}, headers=HTMX
    )
    assert response.status_code == 409
    assert re.search(
        r"Already resolved by reviewer at \d\d:\d\d:\d\d UTC as acknowledge"
        r" — your resolution was not applied",
        response.content.decode(),
    )
    conflict.refresh_from_db()
    assert (conflict.resolved_by, conflict.version, conflict.note) == (acme_reviewer, 2, "")


def test_an_invalid_resolution_is_a_400_with_the_reason(acme: Tenant, acme_reviewer: User) -> None:
    conflict = duplicate_payload_conflict(acme)
    response = client_for(acme_reviewer).post(
        f"/conflicts/{conflict.pk}/resolve/",
        {"resolution": "cancel_run", "expected_version": 1},
        headers=HTMX,
    )
    assert response.status_code == 400
    assert "duplicate_trigger_payload can be resolved with: acknowledge" in response.content.decode()
    assert ConflictArtifact.objects.get(pk=conflict.pk).status == ConflictStatus.OPEN


def test_a_concurrent_edit_conflict_shows_the_diff_of_the_two_contents(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User
) -> None:
    req = waiting_followup(sandbox_acme)
    client = client_for(acme_operator)
    for subject in ("First", "Second"):
        data = {"expected_version": 1, "field:subject": subject, "field:body": "same"}
        client.post(f"/approvals/{req.pk}/edit/", data, headers=HTMX)
    body = client_for(acme_reviewer).get("/conflicts/?kind=concurrent_edit").content.decode()
    assert "--- proposed by operator (based on v1)" in body and "+++ current v2 by operator" in body
    assert (
        '<span class="diff-del">-  Second</span>' in body and '<span class="diff-add">+  First</span>' in body
    )
    assert '<option value="apply_proposed">apply proposed</option>' in body


def test_the_overview_names_an_open_conflicts_kind_in_words_with_the_key_on_hover(
    acme: Tenant, acme_reviewer: User
) -> None:
    services.record_conflict(
        "lease_expired_with_pending_effect", tenant_id=acme.pk, target_key="crm_contact:1"
    )
    body = client_for(acme_reviewer).get("/").content.decode()
    assert (
        'open conflicts: 1 <span title="lease_expired_with_pending_effect">'
        "lease expired with pending effect</span>"
    ) in body
