"""Every page of the console at a phone's width (390 px) and a laptop's (1280 px), and the
console by keyboard alone: nothing sticks out of the screen, every control has a name, a wide
table scrolls inside its frame and that frame can be reached with Tab; an operator logs in and
approves with the keyboard, seeing where the focus is at each step."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from approvals import services
from approvals.models import ApprovalRequest, ApprovalStatus, Artifact
from core.models import User
from tests.e2e.conftest import login, screenshot, watch_csp
from tests.e2e.helpers import console_pages, elsewhere
from tests.e2e.test_approvals_pages import waiting_for_approval

# Elements that end right of the viewport, outside any frame that scrolls or clips them.
STICKING_OUT = """() => {
  const width = document.documentElement.clientWidth;
  const out = [];
  if (document.documentElement.scrollWidth > width + 1) {  // also text running out of its box
    out.push('the page scrolls sideways to ' + document.documentElement.scrollWidth);
  }
  for (const card of document.querySelectorAll('.card')) {  // text running out of a card
    const text = card.textContent.trim().slice(0, 60);
    if (card.scrollWidth > card.clientWidth + 1) out.push('a card overflows: ' + text);
  }
  for (const el of document.querySelectorAll('body *')) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 || box.right <= width + 1) continue;
    let frame = el.parentElement, framed = false;
    while (frame && !framed) {
      framed = ['auto', 'scroll', 'hidden'].includes(getComputedStyle(frame).overflowX);
      frame = frame.parentElement;
    }
    const name = el.tagName.toLowerCase() + (el.id ? '#' + el.id : '');
    if (!framed) out.push(name + ' ends at ' + Math.round(box.right));
  }
  return out.slice(0, 5);
}"""

# Controls a screen reader or a keyboard user could not name.
NAMELESS = """() => {
  const out = [];
  for (const el of document.querySelectorAll('a[href], button, input:not([type=hidden]), select, textarea')) {
    if (el.closest('[hidden]') || el.getClientRects().length === 0) continue;
    const labelled = el.labels && Array.from(el.labels).some(l => l.textContent.trim());
    const name = el.getAttribute('aria-label') || el.getAttribute('title') || el.textContent.trim()
      || (el.getAttribute('aria-labelledby') && document.getElementById(el.getAttribute('aria-labelledby')))
      || el.getAttribute('placeholder') || el.value && el.type === 'submit';
    if (!name && !labelled) out.push(el.outerHTML.slice(0, 120));
  }
  return out;
}"""

# Frames that scroll sideways but cannot be reached (or are not named) for the keyboard.
UNREACHABLE_SCROLLING = """() => Array.from(document.querySelectorAll('.table-wrap'))
  .filter(el => el.scrollWidth > el.clientWidth + 1)
  .filter(el => el.tabIndex < 0 || !el.getAttribute('aria-label'))
  .map(el => (el.previousElementSibling || {}).textContent || el.className)"""


def _content_everywhere() -> dict[str, Any]:
    """A run waiting for approval, and a concurrent-edit conflict on another, so the inbox,
    the conflicts queue, the board and the run page all have rows."""
    waiting = waiting_for_approval()
    other = waiting_for_approval()
    artifact = Artifact.objects.get(step=other.step)
    operator = User.objects.get(username="operator")
    services.artifact_edit(artifact=artifact, user=operator, expected_version=1, content={"body": "first"})
    with pytest.raises(services.EditConflict):
        services.artifact_edit(
            artifact=artifact, user=operator, expected_version=1, content={"body": "second"}
        )
    return {"run_id": waiting.run_id, "approval_id": waiting.pk}


@pytest.mark.parametrize("width,height", [(390, 844), (1280, 800)])
def test_every_page_fits_the_screen_and_names_its_controls(
    live_console: str, browser: Browser, width: int, height: int
) -> None:
    seeded = elsewhere(_content_everywhere)
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    violations = watch_csp(page)
    try:
        page.goto(live_console + "/accounts/login/")
        assert page.evaluate(STICKING_OUT) == [], "login page"
        login(page, live_console, "admin")
        expect(page).to_have_url(live_console + "/")
        paths = console_pages(seeded["run_id"])
        for path in paths:
            response = page.goto(live_console + path)
            assert response is not None and response.status == 200, path
            # Live pages re-fetch their fragments when the socket opens: check what settles.
            expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
            page.wait_for_load_state("networkidle")
            page.wait_for_selector(".htmx-settling, .htmx-swapping", state="detached")
            assert page.evaluate(STICKING_OUT) == [], f"{path} at {width} px"
            assert page.evaluate(NAMELESS) == [], f"{path}: controls without a name"
            assert page.evaluate(UNREACHABLE_SCROLLING) == [], f"{path}: a table frame Tab cannot reach"
            current = page.locator("nav[aria-label=Main] a[aria-current]")
            expect(current).to_have_count(0 if path == "/account/tokens/" else 1)
            if path.startswith("/tenants/acme/"):
                expect(current).to_have_text("Admin · acme")
        if width == 390:
            for path, name in (
                (f"/runs/{seeded['run_id']}/", "run-detail-phone"),
                ("/approvals/", "inbox-phone"),
            ):
                page.goto(live_console + path)
                expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
                page.wait_for_load_state("networkidle")
                screenshot(page, name)
    finally:
        context.close()
    assert not violations, f"a page broke its Content-Security-Policy: {violations}"


def _tab_to(page: Page, selector: str, *, key: str = "Tab", limit: int = 80) -> None:
    """Press Tab (or Shift+Tab) until the focus is on ``selector``; each control passed on the
    way shows the console's own focus ring."""
    for _ in range(limit):
        page.keyboard.press(key)
        ring = page.evaluate(
            """() => { const el = document.activeElement; if (!el || el === document.body) return null;
                       const s = getComputedStyle(el); return [s.outlineStyle, s.outlineWidth]; }"""
        )
        if ring is not None:
            assert ring == ["solid", "2px"], f"a focused control shows no focus ring: {ring}"
        if page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{key} never reached {selector}")


def test_an_operator_logs_in_and_approves_with_the_keyboard_alone(live_console: str, page: Page) -> None:
    request = elsewhere(waiting_for_approval)
    page.goto(live_console + "/accounts/login/")
    expect(page.locator("input[name=username]")).to_be_focused()  # autofocus
    page.keyboard.type("operator")
    _tab_to(page, "input[name=password]")
    page.keyboard.type("runwarden")
    page.keyboard.press("Enter")
    expect(page).to_have_url(live_console + "/")

    # The first Tab offers to skip the navigation; Enter puts the focus on the page's content.
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page.locator("#content")).to_be_focused()

    _tab_to(page, "nav[aria-label=Main] a[href='/approvals/']", key="Shift+Tab")  # back up to the nav
    page.keyboard.press("Enter")
    expect(page).to_have_url(live_console + "/approvals/")
    # The live socket re-fetches the list when it opens: decide on what has settled.
    expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
    page.wait_for_load_state("networkidle")
    expect(
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Approvals")
    ).to_have_attribute("aria-current", "page")

    card = page.locator(f"#approval-{request.pk}")
    _tab_to(page, f"#approval-{request.pk} button[value=approve]")
    page.keyboard.press("Enter")
    expect(card.locator(".badge")).to_have_text("approved")
    screenshot(page, "approved-by-keyboard")
    request.refresh_from_db()
    assert (request.status, request.decided_by) == (
        ApprovalStatus.APPROVED,
        User.objects.get(username="operator"),
    )
    assert ApprovalRequest.objects.filter(step=request.step, status=ApprovalStatus.APPROVED).count() == 1


def _settled_scroll(page: Page, frame: Locator) -> int:
    """The frame's scroll position once a smooth scroll has come to rest."""
    last = -1
    for _ in range(50):
        now = int(frame.evaluate("el => el.scrollLeft"))
        if now == last:
            return now
        last = now
        page.wait_for_timeout(100)
    return last


def test_a_live_refresh_keeps_a_keyboard_users_place_in_a_wide_table(
    live_console: str, browser: Browser
) -> None:
    request = elsewhere(waiting_for_approval)
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    try:
        login(page, live_console, "admin")
        expect(page).to_have_url(live_console + "/")
        page.goto(live_console + f"/runs/{request.run_id}/")
        expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
        page.wait_for_load_state("networkidle")
        steps = page.get_by_role("region", name="Steps (scrolls sideways)")
        expect(steps).to_have_attribute("tabindex", "0")
        steps.focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        left = _settled_scroll(page, steps)
        assert left > 0, "the arrow keys scroll the focused frame"

        # Someone else approves: the run's page refreshes itself over the socket.
        operator = User.objects.get(username="operator")
        elsewhere(
            services.approval_decide,
            request=request,
            user=operator,
            decision="approve",
            expected_version=request.version,
        )
        expect(page.locator("#run-detail")).to_contain_text("approval approved", timeout=10_000)
        steps = page.get_by_role("region", name="Steps (scrolls sideways)")
        expect(steps).to_be_focused()
        assert _settled_scroll(page, steps) == left
    finally:
        context.close()
