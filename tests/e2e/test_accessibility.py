"""axe-core on every page of the console, as the acme admin (who sees every page) with content
on each: no violation of any impact. One browser context, the pages one after another."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from playwright.sync_api import Browser, Page, expect

from approvals.services import record_conflict
from core.models import Tenant
from core.outbox import outbox_drain
from tests.e2e.conftest import login, watch_csp
from tests.e2e.helpers import console_pages, elsewhere
from tests.e2e.test_layout_and_keyboard import _content_everywhere

# axe-core as axe-playwright-python bundles it (a pinned dev dependency): no network needed.
AXE = (files("axe_playwright_python") / "axe.min.js").read_text(encoding="utf-8")
RUN_AXE = "() => axe.run(document, {resultTypes: ['violations']}).then(r => r.violations)"


def _content_on_every_page() -> dict[str, Any]:
    """What the layout test seeds (a run waiting for approval, an edit conflict), plus a
    conflict of the kind with the longest name and the notifications of the inbox."""
    seeded = _content_everywhere()
    acme = Tenant.objects.get(slug="acme")
    record_conflict("lease_expired_with_pending_effect", tenant_id=acme.pk, target_key="crm_contact:1")
    outbox_drain()
    return seeded


def _violations(page: Page) -> list[str]:
    page.evaluate(AXE)
    found: list[dict[str, Any]] = page.evaluate(RUN_AXE)
    return [
        f"{v['id']} ({v['impact']}): {v['help']}\n"
        + "\n".join(f"    {' '.join(node['target'])}: {node['html'][:160]}" for node in v["nodes"][:8])
        + (f"\n    … and {len(v['nodes']) - 8} more" if len(v["nodes"]) > 8 else "")
        for v in found
    ]


def test_axe_finds_no_violation_on_any_page(live_console: str, browser: Browser) -> None:
    seeded = elsewhere(_content_on_every_page)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    csp = watch_csp(page)
    found: dict[str, list[str]] = {}
    try:
        page.goto(live_console + "/accounts/login/")
        found["/accounts/login/"] = _violations(page)
        login(page, live_console, "admin")
        expect(page).to_have_url(live_console + "/")
        for path in console_pages(seeded["run_id"]):
            response = page.goto(live_console + path)
            assert response is not None and response.status == 200, path
            # Live pages re-fetch their fragments when the socket opens: check what settles.
            expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
            page.wait_for_load_state("networkidle")
            found[path] = _violations(page)
    finally:
        context.close()
    report = "\n".join(f"{path}\n  " + "\n  ".join(v) for path, v in found.items() if v)
    assert not report, "axe-core found violations:\n" + report
    assert not csp, f"a page broke its Content-Security-Policy: {csp}"
