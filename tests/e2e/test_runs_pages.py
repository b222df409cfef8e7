from __future__ import annotations

from typing import Any

from playwright.sync_api import Page, Response, expect

from core.leases import lease_acquire
from core.models import Tenant
from runs.models import EffectStatus, Run, RunStatus, SideEffect, Step, StepStatus
from runs.services import run_cancel, run_start
from tests.e2e.conftest import login, screenshot
from tests.e2e.helpers import LIVE_TIMEOUT, elsewhere, go_live


def start(slug: str, **kwargs: Any) -> Run:
    tenant = Tenant.objects.get(slug=slug)
    kwargs.setdefault("input", {"lead_id": 7})
    return run_start(tenant=tenant, workflow="demo.enrich_lead", actor="e2e", **kwargs).run


def test_an_operator_lists_filters_opens_and_cancels_a_run(live_console: str, page: Page) -> None:
    first = start("acme")
    second = start("acme", correlation_id="deal-42")
    foreign = start("globex")
    login(page, live_console, "operator")
    expect(page).to_have_url(live_console + "/")
    page.get_by_role("link", name="Runs", exact=True).click()
    expect(page).to_have_url(live_console + "/runs/")
    expect(page.locator(f"#run-{first.id}")).to_be_visible()
    expect(page.locator(f"#run-{second.id}")).to_be_visible()
    expect(page.locator(f"#run-{foreign.id}")).to_have_count(0)
    expect(page.locator(f"#run-{second.id} .badge")).to_have_text("waiting to start")  # pending
    expect(page.locator(f"#run-{second.id} .badge")).to_have_attribute("title", "pending")
    screenshot(page, "runs-list")

    # Filters swap the table in place and keep the URL shareable.
    page.fill("#filter-correlation", "deal-42")
    page.press("#filter-correlation", "Enter")
    expect(page.locator(f"#run-{first.id}")).to_have_count(0)
    expect(page.locator(f"#run-{second.id}")).to_be_visible()
    expect(page).to_have_url(live_console + "/runs/?status=&workflow=&correlation_id=deal-42&tenant=")
    screenshot(page, "runs-list-filtered")

    page.get_by_role("link", name=second.id).click()
    expect(page).to_have_url(f"{live_console}/runs/{second.id}/")
    expect(page.locator("#step-fetch_lead .badge")).to_have_text("ready")
    expect(page.locator("#step-draft_note")).to_be_visible()
    expect(page.get_by_role("cell", name="created", exact=True)).to_be_visible()
    screenshot(page, "run-detail")

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel run").click()
    expect(page.locator("#run-detail h1 .badge")).to_have_text("cancelled")
    expect(page.get_by_text(f"Run {second.id} cancelled.")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
    expect(page.locator("#step-fetch_lead .badge")).to_have_text("cancelled")
    assert Run.objects.get(pk=second.pk).status == RunStatus.CANCELLED
    assert Run.objects.get(pk=first.pk).status == RunStatus.PENDING
    screenshot(page, "run-detail-cancelled")


def test_the_runs_list_fits_a_laptops_width(live_console: str, page: Page) -> None:
    """At 1280 px every column of the runs list is on screen, the last (Finished) too: its frame
    has nothing to scroll sideways."""
    run = start("acme", input={"lead_id": 8})
    run_cancel(run=run, actor="e2e")  # finished: both of its moments shown
    page.set_viewport_size({"width": 1280, "height": 800})
    login(page, live_console, "operator")
    page.goto(live_console + "/runs/")
    expect(page.locator(f"#run-{run.id} .badge")).to_have_text("cancelled")
    page.wait_for_load_state("networkidle")
    # Read in one go, from a frame on the page: a live refresh may replace it between two reads
    # (a frame no longer on the page measures 0).
    widths = [0, 0]
    for _ in range(50):
        widths = page.locator(".table-wrap").first.evaluate("el => [el.scrollWidth, el.clientWidth]")
        if widths[1]:
            break
        page.wait_for_timeout(100)
    scrolled, shown = widths
    assert shown > 0 and scrolled <= shown + 1, widths


def test_a_dismissed_confirmation_cancels_nothing(live_console: str, page: Page) -> None:
    run = start("acme")
    login(page, live_console, "operator")
    page.goto(f"{live_console}/runs/{run.id}/")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.get_by_role("button", name="Cancel run").click()
    expect(page.get_by_role("button", name="Cancel run")).to_be_visible()
    assert Run.objects.get(pk=run.pk).status == RunStatus.PENDING


def test_the_ownership_board_shows_lease_and_lock_holders(live_console: str, page: Page) -> None:
    acme = Tenant.objects.get(slug="acme")
    run = start("acme")
    lease_acquire(
        tenant_id=acme.pk, key="crm_contact:1", holder="worker-7", ttl=60, metadata={"run_id": run.id}
    )
    Step.objects.filter(run=run, key="fetch_lead").update(
        status=StepStatus.SUCCEEDED,
        attempt=1,
        output={"lead": {"id": 7, "name": "Ada Lovelace", "company": "Analytical Engines Ltd", "score": 91}},
    )
    summarize = Step.objects.get(run=run, key="summarize")
    Step.objects.filter(pk=summarize.pk).update(
        status=StepStatus.RUNNING, attempt=2, lock_keys=["crm_contact:1"], error="TimeoutError: crm took 30 s"
    )
    SideEffect.objects.create(
        tenant=acme,
        run=run,
        step=summarize,
        kind="crm.update_contact",
        idempotency_key=f"{run.id}:summarize:crm.update_contact",
        status=EffectStatus.COMMITTED,
        request_fingerprint="f" * 64,
        external_ref="contact:1@v2",
    )
    lease_acquire(
        tenant_id=Tenant.objects.get(slug="globex").pk, key="crm_contact:1", holder="globex-worker", ttl=60
    )
    login(page, live_console, "operator")
    page.get_by_role("link", name="Leases", exact=True).click()
    expect(page).to_have_url(live_console + "/leases/")
    row = page.locator("#lease-board .board-row", has_text="crm_contact:1")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("worker-7")
    expect(page.get_by_text("globex-worker")).to_have_count(0)
    screenshot(page, "leases")
    row.get_by_role("link", name=run.id).click()
    expect(page).to_have_url(f"{live_console}/runs/{run.id}/")
    expect(page.locator("#run-detail")).to_contain_text("worker-7")
    expect(page.locator("#run-detail")).to_contain_text("contact:1@v2")
    screenshot(page, "run-detail-with-lease-and-effect")


def test_a_click_on_the_ownership_board_is_not_lost_to_its_timed_refresh(
    live_console: str, page: Page
) -> None:
    """The board refreshes itself every 2 s. A refresh swapped in between the press of a run's
    link and its release would replace the link, and the browser would follow nothing: the
    refresh waits for the release, and the click goes through."""
    acme = Tenant.objects.get(slug="acme")
    run = start("acme", input={"lead_id": 9})
    lease_acquire(
        tenant_id=acme.pk, key="crm_contact:9", holder="worker-9", ttl=60, metadata={"run_id": run.id}
    )
    login(page, live_console, "operator")
    page.goto(live_console + "/leases/")
    link = page.locator("#lease-board .board-row", has_text="crm_contact:9").get_by_role("link", name=run.id)
    link.hover()
    page.mouse.down()
    page.wait_for_timeout(2600)  # a timed refresh came due meanwhile
    page.mouse.up()
    expect(page).to_have_url(f"{live_console}/runs/{run.id}/")


def test_a_run_started_elsewhere_appears_on_the_open_list_without_reload(
    live_console: str, page: Page
) -> None:
    login(page, live_console, "operator")
    go_live(page, live_console, "/runs/")
    page.evaluate("window.__sameDocument = true")
    run = elsewhere(start, "acme")
    expect(page.locator(f"#run-{run.id}")).to_be_visible(timeout=LIVE_TIMEOUT)
    # Another tenant's run is pushed to nobody here and never listed.
    foreign = elsewhere(start, "globex")
    other = elsewhere(start, "acme")
    expect(page.locator(f"#run-{other.id}")).to_be_visible(timeout=LIVE_TIMEOUT)
    expect(page.locator(f"#run-{foreign.id}")).to_have_count(0)
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    screenshot(page, "runs-list-live")


def test_a_run_cancelled_elsewhere_updates_the_open_detail_page(live_console: str, page: Page) -> None:
    run = start("acme")
    login(page, live_console, "operator")
    go_live(page, live_console, f"/runs/{run.id}/")
    expect(page.locator("#run-detail h1 .badge")).to_have_text("waiting to start")  # pending
    elsewhere(run_cancel, run=run, actor="someone-else", reason="cancelled by someone-else")
    expect(page.locator("#run-detail h1 .badge")).to_have_text("cancelled", timeout=LIVE_TIMEOUT)
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)


def test_a_live_refresh_keeps_the_filters_in_force(live_console: str, page: Page) -> None:
    login(page, live_console, "operator")
    go_live(page, live_console, "/runs/?status=cancelled")
    page.wait_for_load_state("networkidle")  # the refresh on socket open is done

    def refresh_with_the_filter(response: Response) -> bool:
        return response.url.startswith(live_console + "/runs/?") and "status=cancelled" in response.url

    # The refresh each push causes re-sends status=cancelled: the new pending run stays out...
    with page.expect_response(refresh_with_the_filter, timeout=LIVE_TIMEOUT):
        run = elsewhere(start, "acme")
    expect(page.locator(f"#run-{run.id}")).to_have_count(0)
    # ...and the run shows up once it is cancelled.
    elsewhere(run_cancel, run=run, actor="someone-else", reason="cancelled by someone-else")
    expect(page.locator(f"#run-{run.id}")).to_be_visible(timeout=LIVE_TIMEOUT)
    expect(page.locator("#filter-status")).to_have_value("cancelled")
