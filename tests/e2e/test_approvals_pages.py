from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Browser, Locator, Page, Route, WebSocketRoute, expect

from approvals import services
from approvals.models import ApprovalRequest, ApprovalStatus, Artifact, ConflictArtifact, ConflictStatus
from core.models import Tenant, User
from runs.models import Step
from runs.services import run_start
from tests.approvals.helpers import RESUMED, pending_request, pump
from tests.e2e.conftest import login, screenshot
from tests.e2e.helpers import LIVE_TIMEOUT, elsewhere, go_live


def waiting_for_approval(slug: str = "acme") -> ApprovalRequest:
    """A demo.lead_followup run driven in-process up to its gated send_message step."""
    tenant = Tenant.objects.get(slug=slug)
    run = run_start(
        tenant=tenant, workflow="demo.lead_followup", input={"lead_id": 7, "contact_id": 1}, actor="e2e"
    ).run
    pump()
    return pending_request(run)


def test_an_operator_approves_from_the_inbox(live_console: str, page: Page) -> None:
    login(page, live_console, "operator")
    expect(page).to_have_url(live_console + "/")
    page.get_by_role("link", name="Approvals", exact=True).click()
    expect(page).to_have_url(live_console + "/approvals/")
    req = elsewhere(waiting_for_approval)
    go_live(page, live_console, "/approvals/")
    card = page.locator(f"#approval-{req.pk}")
    expect(card).to_be_visible()
    expect(card.get_by_role("link", name=req.run_id)).to_be_visible()
    expect(card).to_contain_text("Next steps for Company 7")
    expect(card.locator(".badge")).to_have_text("pending")
    screenshot(page, "approvals-inbox")

    card.get_by_role("button", name="Approve", exact=True).click()
    expect(card.locator(".badge")).to_have_text("approved")
    expect(card).to_contain_text("Approved by operator")
    expect(card.get_by_role("button", name="Approve", exact=True)).to_have_count(0)
    # The live refresh the approval pushes keeps the decided card on screen.
    page.wait_for_load_state("networkidle")
    expect(card.locator(".badge")).to_have_text("approved")
    screenshot(page, "approvals-inbox-approved")
    req.refresh_from_db()
    assert (req.status, req.version) == (ApprovalStatus.APPROVED, 2)
    assert Step.objects.get(pk=req.step_id).status in RESUMED  # admitted by the console itself, or ready


def test_a_pending_request_appears_live(live_console: str, page: Page) -> None:
    login(page, live_console, "operator")
    go_live(page, live_console, "/approvals/")
    page.evaluate("window.__sameDocument = true")
    req = elsewhere(waiting_for_approval)
    expect(page.locator(f"#approval-{req.pk}")).to_be_visible(timeout=LIVE_TIMEOUT)
    assert page.evaluate("window.__sameDocument") is True


def test_two_tabs_race_and_the_second_sees_who_won(live_console: str, browser: Browser, page: Page) -> None:
    req = elsewhere(waiting_for_approval)
    login(page, live_console, "operator")
    page.goto(live_console + "/approvals/")

    other = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        late = other.new_page()
        # The second tab's live push is "still on its way" (pushes are hints, delivered at most
        # once): its socket is mocked, so it keeps showing version 1 of the request, as a tab
        # would if the user clicked before the push landed.
        late.route_web_socket("**/ws/live/", _never_delivers)
        login(late, live_console, "admin")
        late.goto(live_console + "/approvals/")
        expect(late.locator(f"#approval-{req.pk} .badge")).to_have_text("pending")

        page.locator(f"#approval-{req.pk}").get_by_role("button", name="Approve", exact=True).click()
        expect(page.locator(f"#approval-{req.pk} .badge")).to_have_text("approved")

        card = late.locator(f"#approval-{req.pk}")
        card.get_by_role("button", name="Approve", exact=True).click()
        notice = card.locator(".notice")
        expect(notice).to_contain_text("Already approved by operator at ")
        expect(notice).to_contain_text("on version 1 — your decision was not applied")
        expect(card.locator(".badge")).to_have_text("approved")
        screenshot(page, "approvals-race-first-tab")
        screenshot(late, "approvals-race-second-tab")
    finally:
        other.close()
    req.refresh_from_db()
    assert (req.status, req.version, req.decided_by) == (
        ApprovalStatus.APPROVED,
        2,
        User.objects.get(username="operator"),
    )


def _never_delivers(ws: WebSocketRoute) -> None:
    """Leave the socket open but never connected to the server."""


def _open_conflicts() -> tuple[ConflictArtifact, ConflictArtifact]:
    req = waiting_for_approval()
    operator = User.objects.get(username="operator")
    admin = User.objects.get(username="admin")
    artifact = Artifact.objects.get(pk=req.artifact_id)
    content = dict(req.artifact_version.content)
    services.artifact_edit(
        artifact=artifact, user=operator, expected_version=1, content={**content, "subject": "Quick call?"}
    )
    try:
        services.artifact_edit(
            artifact=artifact,
            user=admin,
            expected_version=1,
            content={**content, "body": content["body"].replace("this week", "on Friday")},
        )
    except services.EditConflict as lost:
        assert lost.conflict is not None
        edit = lost.conflict
    duplicate = services.record_conflict(
        "duplicate_trigger_payload",
        tenant_id=req.tenant_id,
        target_key="trigger:evt-9",
        current={"input": {"lead_id": 7}},
        proposed={"input": {"lead_id": 8}},
    )
    return edit, duplicate


def test_a_reviewer_resolves_a_conflict(live_console: str, page: Page) -> None:
    edit, duplicate = elsewhere(_open_conflicts)
    login(page, live_console, "reviewer")
    page.get_by_role("link", name="Conflicts", exact=True).click()
    expect(page).to_have_url(live_console + "/conflicts/")
    expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
    page.wait_for_load_state("networkidle")  # the refresh on socket open is done
    card = page.locator(f"#conflict-{duplicate.pk}")
    expect(card.locator(".kind")).to_have_text("duplicate trigger payload")
    expect(card.locator('.kind [title="duplicate_trigger_payload"]')).to_have_count(1)
    expect(page.locator(f"#conflict-{edit.pk} .kind")).to_have_text("concurrent edit")
    expect(page.locator(f"#conflict-{edit.pk} .diff-add").first).to_be_visible()
    card.locator("select[name=resolution]").select_option("acknowledge")
    card.locator("input[name=note]").fill("sender fixed its ids")
    card.get_by_role("button", name="Resolve").click()
    expect(card.locator(".badge")).to_have_text("resolved")
    expect(card).to_contain_text("Resolved by reviewer")
    page.wait_for_load_state("networkidle")
    screenshot(page, "conflicts-queue")
    duplicate.refresh_from_db()
    assert (duplicate.status, duplicate.note) == (ConflictStatus.RESOLVED, "sender fixed its ids")
    assert ConflictArtifact.objects.get(pk=edit.pk).status == ConflictStatus.OPEN


def test_an_edit_shows_the_diff_and_needs_a_new_approval(live_console: str, page: Page) -> None:
    req = elsewhere(waiting_for_approval)
    login(page, live_console, "operator")
    go_live(page, live_console, "/approvals/")
    page.wait_for_load_state("networkidle")
    card = page.locator(f"#approval-{req.pk}")
    card.get_by_text("Edit", exact=True).click()
    card.locator("textarea[name='field:subject']").fill("Quick call on Friday?")
    card.get_by_role("button", name="Save as new version").click()
    expect(page.get_by_text("Saved version 2")).to_be_visible()
    new = ApprovalRequest.objects.get(step_id=req.step_id, status=ApprovalStatus.PENDING)
    fresh = page.locator(f"#approval-{new.pk}")
    expect(fresh).to_contain_text("artifact v2")
    expect(fresh.locator(".diff-add")).to_contain_text("Quick call on Friday?")
    expect(fresh.locator(".diff-del")).to_contain_text("Next steps for Company 7")
    expect(card).to_have_count(0)
    # The editor wrote version 2, so someone else must approve it.
    fresh.get_by_role("button", name="Approve", exact=True).click()
    expect(fresh.locator(".notice")).to_contain_text("you started this run or wrote this version")
    expect(fresh.locator(".badge")).to_have_text("pending")
    screenshot(page, "approvals-inbox-edited")
    assert ApprovalRequest.objects.get(pk=req.pk).status == ApprovalStatus.INVALIDATED
    assert ApprovalRequest.objects.get(pk=new.pk).version == 1


def test_a_decision_is_shown_when_a_live_refresh_lands_while_it_is_on_its_way(
    live_console: str, page: Page
) -> None:
    """A live refresh of the list answered while a card's decision is still on its way would
    replace that card, and the decision's answer would then go to the card no longer on
    screen: the operator would see nothing happen. The refresh's answer is left out, and the
    list refreshed again once the decision's answer is in. No push reaches the page (its socket
    is held), so the refreshes are the page's own."""
    req, card = _a_pending_card_without_pushes(live_console, page)
    held: list[Route] = []
    seen: set[str] = set()

    def hold_the_first(route: Route) -> None:
        kind = "decision" if route.request.method == "POST" else "refresh"
        if kind in seen:
            route.continue_()
        else:
            seen.add(kind)
            held.append(route)

    page.route(re.compile(r"/approvals/\?"), hold_the_first)  # the list's live refresh
    page.route(re.compile(r"/approvals/\d+/decide/$"), hold_the_first)
    page.evaluate(
        "window.__listAnswered = false;"
        " document.addEventListener('htmx:afterRequest', function (e) {"
        "   if (e.detail.target && e.detail.target.id === 'approvals-list') { window.__listAnswered = true; }"
        " });"
        " document.body.dispatchEvent(new CustomEvent('live:resync'))"
    )
    refresh = _held(page, held)
    card.get_by_role("button", name="Approve", exact=True).click()
    decision = _held(page, held)
    refresh.continue_()  # the list is answered first, the decision still on its way
    _polled(page, lambda: page.evaluate("window.__listAnswered"))
    page.evaluate("window.__listAnswered = false")
    decision.continue_()
    expect(card.locator(".notice")).to_contain_text("Approved version 1")
    # The list refreshed again once the decision was in (no push could have asked for it),
    # the card approved, its notice kept.
    _polled(page, lambda: page.evaluate("window.__listAnswered"))
    expect(card.locator(".badge")).to_have_text("approved")
    expect(card.locator(".notice")).to_contain_text("Approved version 1")
    req.refresh_from_db()
    assert req.status == ApprovalStatus.APPROVED


@pytest.mark.parametrize("refresh", ["asked during the press", "answered during the press"])
def test_a_live_refresh_while_a_button_is_pressed_waits_for_its_release(
    live_console: str, page: Page, refresh: str
) -> None:
    """A refresh swapped in between the press of Approve and its release would replace the
    button being pressed: the browser fires no click for a button no longer on the page, and
    the approval would be lost without a word. A refresh asked for during the press is not sent,
    one already on its way is not swapped in; the click goes through, and the list is refreshed
    after the decision's answer."""
    req, card = _a_pending_card_without_pushes(live_console, page)
    page.evaluate(
        "window.__listAnswered = 0;"
        " document.addEventListener('htmx:afterRequest', function (e) {"
        "   if (e.detail.target && e.detail.target.id === 'approvals-list') { window.__listAnswered += 1; }"
        " });"
    )
    held: list[Route] = []
    refreshes: list[Route] = []

    def hold_the_first(route: Route) -> None:
        refreshes.append(route)
        if len(refreshes) == 1:
            held.append(route)
        else:
            route.continue_()

    if refresh == "answered during the press":
        page.route(re.compile(r"/approvals/\?"), hold_the_first)
        page.evaluate("document.body.dispatchEvent(new CustomEvent('live:resync'))")
        sent = _held(page, held)
    card.get_by_role("button", name="Approve", exact=True).hover()
    page.mouse.down()
    if refresh == "asked during the press":
        page.evaluate("document.body.dispatchEvent(new CustomEvent('live:resync'))")
        page.wait_for_timeout(300)
        page.wait_for_load_state("networkidle")  # a refresh sent meanwhile has been answered
    else:
        sent.continue_()
        _polled(page, lambda: page.evaluate("window.__listAnswered") == 1)  # answered while pressed
    page.mouse.up()
    expect(card.locator(".notice")).to_contain_text("Approved version 1")
    owed = 2 if refresh == "answered during the press" else 1
    _polled(page, lambda: page.evaluate("window.__listAnswered") >= owed)  # the refresh owed
    expect(card.locator(".badge")).to_have_text("approved")
    req.refresh_from_db()
    assert req.status == ApprovalStatus.APPROVED


def test_a_live_refresh_while_space_is_held_on_a_button_waits_for_its_release(
    live_console: str, page: Page
) -> None:
    """A keyboard user's Space clicks Approve as the key comes up: a refresh swapped in while it
    is held would take that click as a press's would. The refresh waits for the key."""
    req, card = _a_pending_card_without_pushes(live_console, page)
    card.get_by_role("button", name="Approve", exact=True).focus()
    page.keyboard.down(" ")
    page.evaluate("document.body.dispatchEvent(new CustomEvent('live:resync'))")
    page.wait_for_timeout(300)
    page.wait_for_load_state("networkidle")  # a refresh sent meanwhile has been answered
    page.keyboard.up(" ")
    expect(card.locator(".notice")).to_contain_text("Approved version 1")
    req.refresh_from_db()
    assert req.status == ApprovalStatus.APPROVED


def _a_pending_card_without_pushes(live_console: str, page: Page) -> tuple[ApprovalRequest, Locator]:
    """A request waiting for approval, and its card in the inbox of a page no push reaches (its
    socket is held): the list's refreshes are the page's own."""
    req = elsewhere(waiting_for_approval)
    page.route_web_socket("**/ws/live/", _never_delivers)
    login(page, live_console, "operator")
    page.goto(live_console + "/approvals/")
    card = page.locator(f"#approval-{req.pk}")
    expect(card.locator(".badge")).to_have_text("pending")
    page.wait_for_load_state("networkidle")
    return req, card


def _polled(page: Page, condition: Callable[[], object]) -> object:
    """``condition()`` once it is true, asked every 50 ms for 5 s (route handlers run while
    Playwright waits; ``wait_for_function`` would eval, which the console's CSP refuses)."""
    for _ in range(100):
        if result := condition():
            return result
        page.wait_for_timeout(50)
    raise AssertionError("it never came about")


def _held(page: Page, held: list[Route]) -> Route:
    """The request a route holds, once the browser has sent it."""
    _polled(page, lambda: held)
    return held.pop()
