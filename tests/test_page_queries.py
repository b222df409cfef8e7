"""The cockpit's pages cost the same number of queries whatever the size of what they show: a run
with one step or five, a board with one key or twelve (each with waiters), an overview of one
run or forty."""

from __future__ import annotations

from collections.abc import Callable

from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext

from core.models import Tenant, User
from runs.dispatch import dispatch_round
from runs.models import Run
from runs.services import run_start
from tests.conftest import client_for

NO_CAPS = {"global": 500, "tenant_default": 500, "workflow": {}, "lane": {}, "tool": {}}


def queries(client: Client, path: str, headers: dict[str, str] | None = None) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, headers=headers or {})
    assert response.status_code == 200, path
    return len(captured)


def crm(tenant: Tenant, contact: int, stage: str = "won") -> Run:
    data = {"contact_id": contact, "changes": {"stage": stage}}
    return run_start(tenant=tenant, workflow="demo.crm_update", input=data, actor="t").run


@override_settings(RUNWARDEN_CAPS=NO_CAPS)
def test_the_run_page_is_flat_in_its_steps(sandbox_acme: Tenant, acme_operator: User) -> None:
    one = run_start(tenant=sandbox_acme, workflow="bench.noop", input={}, actor="t").run
    three = run_start(tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t").run
    client = client_for(acme_operator)
    assert queries(client, f"/runs/{one.id}/") == queries(client, f"/runs/{three.id}/")


@override_settings(RUNWARDEN_CAPS=NO_CAPS)
def test_the_board_is_flat_in_keys_and_waiters(sandbox_acme: Tenant, acme_operator: User) -> None:
    client = client_for(acme_operator)

    def board_with(contacts: int) -> Callable[[], int]:
        for contact in range(1, contacts + 1):
            crm(sandbox_acme, contact)
        dispatch_round()  # the first run of each contact holds its lock
        for contact in range(1, contacts + 1):
            crm(sandbox_acme, contact, "second")  # and one waits behind it
        return lambda: queries(client, "/leases/", {"HX-Request": "true"})

    small = board_with(1)()
    large = board_with(12)()
    assert small == large, (small, large)


def test_the_overview_is_flat_in_runs(acme: Tenant, acme_operator: User) -> None:
    client = client_for(acme_operator)
    run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t")
    small = queries(client, "/")
    for n in range(40):
        run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": n + 2}, actor="t")
    assert queries(client, "/") == small


def test_the_inbox_is_flat_in_notifications_and_their_decisions(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User
) -> None:
    from approvals.services import approval_decide
    from core.outbox import outbox_drain
    from tests.approvals.helpers import waiting_followup

    client = client_for(acme_reviewer)

    def decided(n: int) -> int:
        """The inbox after ``n`` more requests were notified and decided (no card is pending)."""
        for _ in range(n):
            request = waiting_followup(sandbox_acme)
            outbox_drain()
            approval_decide(request=request, user=acme_operator, decision="reject", expected_version=1)
        return queries(client, "/approvals/")

    assert decided(1) == decided(4)
