"""What the browser tests share: acting as another process would, and waiting for the live socket."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import connection
from playwright.sync_api import Page, expect

LIVE_TIMEOUT = 5_000  # ms: a pushed change must show up without a reload within this

T = TypeVar("T")


def elsewhere(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in another thread, as another process would: sync Playwright runs an event
    loop in the test's thread, where the on-commit live push (async_to_sync) cannot run."""

    def call() -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


def go_live(page: Page, base_url: str, path: str) -> None:
    """Open ``path`` and wait until its live socket is connected."""
    page.goto(base_url + path)
    expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)


def console_pages(run_id: str) -> list[str]:
    """Every page of the console an admin of acme reaches, after login (``run_id``: a run of acme)."""
    return [
        "/",
        "/runs/",
        f"/runs/{run_id}/",
        "/leases/",
        "/approvals/",
        "/conflicts/",
        "/sessions/acme/",
        "/tenants/acme/members/",
        "/tenants/acme/quotas/",
        "/tenants/acme/audit/",
        "/tenants/acme/connections/",
        "/account/tokens/",
    ]
