"""Reading many approval requests at once: the API's list and the console's inbox read a page in
a fixed number of queries, whatever its length, and show each request as its own read does."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from core.models import Tenant, User
from tests.approvals.helpers import waiting_followup
from tests.conftest import bearer_client, client_for

pytestmark = [pytest.mark.both_dialects, pytest.mark.django_db(transaction=True)]


def queries_of(client: Client, url: str) -> int:
    client.get(url)  # what a client's first read does once (its token's first use) is not counted
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, response.content[:300]
    return len(captured.captured_queries)


def test_a_page_of_requests_is_read_in_as_many_queries_whatever_its_length(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    api, console = bearer_client(acme_operator), client_for(acme_operator)
    for _ in range(2):
        waiting_followup(sandbox_acme)
    api_reads, inbox_reads = queries_of(api, "/api/v1/approvals"), queries_of(console, "/approvals/")
    for _ in range(3):
        waiting_followup(sandbox_acme)
    assert len(api.get("/api/v1/approvals").json()) == 5
    assert queries_of(api, "/api/v1/approvals") == api_reads  # not one more per request
    assert queries_of(console, "/approvals/") == inbox_reads


def test_the_list_shows_each_request_as_its_own_read_does(sandbox_acme: Tenant, acme_operator: User) -> None:
    """Each listed request carries its own artifact's versions and the baseline of its diff: one
    approved and then edited (its new request diffs against the approved version), one never
    decided (no diff)."""
    api = bearer_client(acme_operator)
    approved = waiting_followup(sandbox_acme)
    decided = api.post(
        f"/api/v1/approvals/{approved.pk}/approve",
        data=json.dumps({"comment": ""}),
        content_type="application/json",
        headers={"If-Match": '"1"'},
    )
    assert decided.status_code == 200, decided.content
    edited = api.post(
        f"/api/v1/approvals/{approved.pk}/artifact",
        data=json.dumps({"content": {"subject": "Shorter", "body": "Call?"}}),
        content_type="application/json",
        headers={"If-Match": '"1"'},
    )
    assert edited.status_code == 201, edited.content
    untouched = waiting_followup(sandbox_acme)
    listed = api.get("/api/v1/approvals?status=pending").json()
    by_id = {request["id"]: request for request in listed}
    assert set(by_id) == {edited.json()["id"], untouched.pk}
    assert (by_id[edited.json()["id"]]["diff_against"], by_id[untouched.pk]["diff_against"]) == (1, None)
    assert by_id[edited.json()["id"]]["diff"] and not by_id[untouched.pk]["diff"]
    assert listed == [api.get(f"/api/v1/approvals/{request['id']}").json() for request in listed]
