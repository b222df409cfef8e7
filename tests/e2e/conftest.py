from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from playwright.sync_api import Browser, Page, sync_playwright

from tests.servers import ROOT, base_env, console_server, seed_demo_for_servers

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = ROOT / "test-results"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _allow_orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sync Playwright runs an event loop in this thread; the test's own ORM calls are still
    # sequential, so Django's async-safety guard may be lifted here (browser tests only).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def live_console(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    """The console served by a real ``manage.py serve`` process on the test database."""
    db = settings.DATABASES["default"]
    database_url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env = base_env(
        DEBUG="1", DATABASE_URL=database_url, REDIS_URL=settings.REDIS_URL, DEMO_PASSWORD="runwarden"
    )
    seed_demo_for_servers()
    with console_server(env, tmp_path / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    violations = watch_csp(page)
    yield page
    context.close()
    assert not violations, f"the page broke its Content-Security-Policy: {violations}"


def watch_csp(page: Page) -> list[str]:
    """Collect the page's Content-Security-Policy violations (assert the list is empty)."""
    violations: list[str] = []
    page.on(
        "console",
        lambda message: (
            violations.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return violations


def login(page: Page, base_url: str, username: str, password: str = "runwarden") -> None:
    page.goto(base_url + "/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def screenshot(page: Page, name: str) -> Path:
    """Into test-results/; with RUNWARDEN_SCREENSHOTS set (a folder, e.g. docs/screenshots),
    there too: the README's screenshots are taken by these tests."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("RUNWARDEN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(keep) / f"{name}.png"), full_page=True)
    return path
