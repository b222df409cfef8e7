"""Redis stopped under an open console: /readyz names it, the page shows it is not live
(reconnecting), and once Redis is back the page is live again and shows a change made while
it was away — without a reload."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import login
from tests.e2e.helpers import elsewhere
from tests.e2e.test_runs_pages import start
from tests.runs.test_faults import private_redis
from tests.servers import base_env, console_server, database_url, seed_demo_for_servers


def _ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as down:
        return down.code


@pytest.fixture
def console_on_private_redis(transactional_db: None, tmp_path: Path) -> Iterator[tuple[str, object]]:
    with private_redis() as (redis_url, set_running):
        env = base_env(
            DEBUG="1",
            DATABASE_URL=database_url(),
            REDIS_URL=redis_url,
            DEMO_PASSWORD="runwarden",
        )
        seed_demo_for_servers()
        with console_server(env, tmp_path / "serve.log") as url:
            yield url, set_running


def test_the_page_shows_reconnecting_while_redis_is_down_and_recovers(
    console_on_private_redis: tuple[str, object], page: Page
) -> None:
    url, set_running = console_on_private_redis
    login(page, url, "operator")
    page.goto(url + "/runs/")
    expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
    page.evaluate("window.__sameDocument = true")
    set_running(False)  # type: ignore[operator]
    try:
        assert _ready(url) == 503
        expect(page.locator("#live-status.on")).to_have_count(0, timeout=20_000)  # not live: reconnecting
        run = elsewhere(start, "acme")  # a change while the page cannot hear about it
    finally:
        set_running(True)  # type: ignore[operator]
    assert _ready(url) == 200
    expect(page.locator("#live-status.on")).to_be_visible(timeout=40_000)
    # Reconnected: the page re-fetched what it missed.
    expect(page.locator(f"#run-{run.id}")).to_be_visible(timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True
