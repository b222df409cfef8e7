# ruff: noqa: E501
"""The operator's cockpit in the browser, against the real server, PostgreSQL and Redis: the
overview's figures and chart change without reload, the ownership board shows a waiter and its
reason and drops it when the lock frees, a run page explains a blocked step, a quota change
shows on the board. Admission and execution run in this process (dispatch_round, step_execute)
on the same database, as a worker would."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import Page, expect

from core import services as core_services
from core.models import Tenant, User
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.models import Run
from runs.services import run_start
from tests.e2e.conftest import login, screenshot
from tests.e2e.helpers import LIVE_TIMEOUT, elsewhere, go_live

BOARD_TIMEOUT = 6_000  # ms: the board refreshes on pushes and every 2 s


def crm(contact: int, stage: str) -> Run:
    tenant = Tenant.objects.get(slug="acme")
    data: dict[str, Any] = {"contact_id": contact, "changes": {"stage": stage}}
    return run_start(tenant=tenant, workflow="demo.crm_update", input=data, actor="e2e").run


def test_the_overview_figures_and_chart_change_without_reload(live_console: str, page: Page) -> None:
    login(page, live_console, "operator")
    go_live(page, live_console, "/")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#fig-ready")).to_have_text("0")
    bars_before = page.locator("#chart-finished rect").count()
    runs = [elsewhere(crm, 10 + n, "won") for n in range(3)]
    expect(page.locator("#fig-ready")).to_have_text("3", timeout=LIVE_TIMEOUT)
    for admission in elsewhere(dispatch_round):
        elsewhere(step_execute, step_id=admission.step_id, token=admission.token)
    expect(page.locator("#fig-ready")).to_have_text("0", timeout=LIVE_TIMEOUT)
    expect(page.locator("#fig-finished-hour")).to_have_text("3", timeout=LIVE_TIMEOUT)
    # Each update took its contact's lock at admission: three lock waits, in this tenant's tally.
    expect(page.locator("#fig-lock-wait")).to_contain_text("Lock waits: 3, p50 ≤ ", timeout=LIVE_TIMEOUT)
    assert page.locator("#chart-finished rect").count() > bars_before, "the chart drew the finished runs"
    assert page.evaluate("window.__sameDocument") is True
    assert all(Run.objects.get(pk=r.id).status == "succeeded" for r in runs)
    screenshot(page, "overview")


def test_the_board_shows_a_waiter_and_why_then_drops_it_and_the_run_page_explains(
    live_console: str, page: Page
) -> None:
    holder = elsewhere(crm, 1, "proposal")
    [admission] = elsewhere(dispatch_round)  # the holder takes crm_contact:1 (no worker runs it yet)
    waiter = elsewhere(crm, 1, "won")
    login(page, live_console, "operator")
    go_live(page, live_console, "/leases/")
    row = page.locator('#lease-board .board-row[data-keys~="crm_contact:1"]')  # its holder's card
    expect(row).to_contain_text(holder.id, timeout=BOARD_TIMEOUT)
    expect(row.locator(".waiter")).to_have_count(1, timeout=BOARD_TIMEOUT)
    expect(row.locator(".waiter")).to_contain_text(waiter.id)
    expect(row.locator(".waiter")).to_contain_text("waits for the lock crm_contact:1")
    screenshot(page, "ownership-board")

    page.goto(f"{live_console}/runs/{waiter.id}/")
    expect(page.locator("#wait-apply_changes")).to_contain_text(
        "Why not running: waits for the lock crm_contact:1"
    )
    page.locator("#wait-apply_changes").get_by_role("link", name=holder.id).click()
    expect(page).to_have_url(f"{live_console}/runs/{holder.id}/")
    screenshot(page, "run-page-explained")

    go_live(page, live_console, "/leases/")
    elsewhere(step_execute, step_id=admission.step_id, token=admission.token)
    elsewhere(dispatch_round)  # the waiter is admitted: it holds the lock now, nobody waits
    expect(row).to_contain_text(waiter.id, timeout=BOARD_TIMEOUT)
    expect(row.locator(".waiter")).to_have_count(0, timeout=BOARD_TIMEOUT)


def test_a_quota_change_shows_on_the_board(live_console: str, page: Page) -> None:
    acme = Tenant.objects.get(slug="acme")
    admin = User.objects.get(username="admin")
    elsewhere(
        core_services.tenant_quota_update, tenant=acme, actor=admin, changes={"caps": {"tool": {"crm": 1}}}
    )
    elsewhere(crm, 2, "a")
    elsewhere(dispatch_round)  # contact 2's update takes the tenant's only crm seat
    login(page, live_console, "admin")
    go_live(page, live_console, "/leases/")
    seat = page.locator('#board-caps [data-scope="acme tool crm"]')
    expect(seat).to_have_text("acme · tool crm: 1 of 1 · full", timeout=BOARD_TIMEOUT)
    # The admin raises the cap in the console; the board shows it at its next refresh.
    page.goto(f"{live_console}/tenants/acme/quotas/")
    page.fill("input[name='cap__tool__crm']", "3")
    page.get_by_role("button", name="Save quotas").click()
    expect(page.get_by_text("Quota of acme saved")).to_be_visible()
    go_live(page, live_console, "/leases/")
    expect(seat).to_have_text("acme · tool crm: 1 of 3", timeout=BOARD_TIMEOUT)


def _gated() -> Run:
    from tests.approvals.helpers import pump

    tenant = Tenant.objects.get(slug="acme")
    run = run_start(
        tenant=tenant, workflow="demo.lead_followup", input={"lead_id": 5, "contact_id": 5}, actor="bot"
    ).run
    pump()
    return run


def test_a_new_approval_lights_the_inbox_badge_without_reload(live_console: str, page: Page) -> None:
    login(page, live_console, "operator")
    go_live(page, live_console, "/runs/")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#inbox-badge")).to_have_text("0")
    elsewhere(_gated)
    expect(page.locator("#inbox-badge")).to_have_text("1", timeout=LIVE_TIMEOUT)
    assert page.evaluate("window.__sameDocument") is True
