"""A tenant admin manages members, every cap and reads the audit log in the browser; a role
change closes the member's live socket; Django's admin stays closed to tenant admins."""

from __future__ import annotations

from playwright.sync_api import Browser, Page, WebSocket, expect

from tests.e2e.conftest import login, screenshot


def test_an_admin_adds_a_member_changes_the_role_and_the_members_socket_reconnects(
    live_console: str, page: Page, browser: Browser
) -> None:
    login(page, live_console, "admin")
    page.get_by_role("link", name="Admin · acme").click()
    expect(page.get_by_role("heading", name="Members of Acme Corp")).to_be_visible()
    form = page.locator("#member-add")
    form.locator("input[name=username]").fill("frank")
    form.locator("select[name=role]").select_option("operator")
    form.locator("input[name=password]").fill("frank-long-password-1")
    form.get_by_role("button", name="Add member").click()
    expect(page.locator(".messages")).to_contain_text("frank is now operator of acme")

    # Frank logs in elsewhere and goes live.
    context = browser.new_context(viewport={"width": 390, "height": 844})
    frank = context.new_page()
    closed: list[str] = []

    def watch(ws: WebSocket) -> None:
        ws.on("close", lambda _: closed.append(ws.url))

    frank.on("websocket", watch)
    login(frank, live_console, "frank", password="frank-long-password-1")
    expect(frank.locator("#live-status.on")).to_be_visible(timeout=10_000)
    assert not closed

    row = page.locator("#members tr[data-username=frank]")
    row.locator("select[name=role]").select_option("reviewer")
    row.get_by_role("button", name="Change role").click()
    expect(page.locator(".messages")).to_contain_text("frank is now reviewer")
    expect(page.locator("#members tr[data-username=frank] select[name=role]")).to_have_value("reviewer")
    for _ in range(100):
        if closed:
            break
        frank.wait_for_timeout(100)
    assert closed, "the member's open socket closed when the role changed"
    expect(frank.locator("#live-status.on")).to_be_visible(timeout=15_000)  # and reconnected
    screenshot(page, "members-admin")

    # Removing the last admin is refused with a reason.
    page.locator("#members tr[data-username=admin]").get_by_role("button", name="Remove admin").click()
    expect(page.get_by_role("alert")).to_contain_text("last admin")

    page.get_by_role("navigation", name="Tenant administration").get_by_role("link", name="Audit log").click()
    expect(page.locator("#audit")).to_contain_text("membership_role_changed")
    page.fill("input[name=verb]", "membership_added")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#audit tbody tr")).to_have_count(1)
    expect(page.locator("#audit")).to_contain_text("user:frank")
    screenshot(page, "audit-log")
    context.close()


def test_the_acme_admin_sees_no_globex_object_and_no_django_admin(live_console: str, page: Page) -> None:
    login(page, live_console, "admin")
    expect(page).to_have_url(live_console + "/")
    page.goto(live_console + "/admin/")
    expect(page).to_have_url(live_console + "/admin/login/?next=/admin/")
    for path in ("/tenants/globex/members/", "/tenants/globex/quotas/", "/tenants/globex/audit/"):
        response = page.goto(live_console + path)
        assert response is not None and response.status == 404, path
