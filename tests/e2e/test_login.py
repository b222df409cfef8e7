from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.e2e.conftest import login, screenshot


def test_an_operator_logs_in_sees_their_tenant_and_goes_live(live_console: str, page: Page) -> None:
    login(page, live_console, "operator")
    expect(page).to_have_url(live_console + "/")
    expect(page.get_by_role("heading", name="Acme Corp")).to_be_visible()
    expect(page.get_by_text("Globex Corporation")).to_have_count(0)
    # The live websocket (Channels over Redis) connected through the origin validator.
    expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
    screenshot(page, "overview-operator")


def test_a_wrong_password_is_refused(live_console: str, page: Page) -> None:
    login(page, live_console, "operator", password="wrong")
    expect(page.get_by_text("didn't match")).to_be_visible()
    expect(page).to_have_url(live_console + "/accounts/login/")


def test_an_admin_edits_the_quota_in_the_browser(live_console: str, page: Page) -> None:
    login(page, live_console, "admin")
    page.get_by_role("link", name="Admin · acme").click()
    page.get_by_role("navigation", name="Tenant administration").get_by_role("link", name="Quotas").click()
    page.fill("input[name=max_concurrent_steps]", "7")
    page.fill("input[name='cap__lane__high_risk']", "1")
    page.get_by_role("button", name="Save quotas").click()
    expect(page.get_by_text("Quota of acme saved")).to_be_visible()
    expect(page.locator("input[name='cap__lane__high_risk']")).to_have_value("1")
    expect(page.locator("input[name=max_concurrent_steps]")).to_have_value("7")
    screenshot(page, "quotas-admin")
