"""The web process's request threads (core/request_threads.py): every HTTP request's synchronous
code runs on one of a few long-lived threads, each keeping its database connection."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import AsyncToSync, sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.db import DEFAULT_DB_ALIAS, connection, connections

from core import rawsql, request_threads
from core.request_threads import RequestThreads
from tests.servers import base_env, console_server, database_url

THREADS = 3


class _RecordingApp:
    """An ASGI app whose request does thread-sensitive synchronous work, as Django's handler does."""

    def __init__(self) -> None:
        self.threads: set[tuple[int | None, str]] = set()
        self.preparing: set[bool] = set()  # whether each request's hand-written SQL is prepared
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def _work(self) -> None:
        with self._lock:
            self.threads.add((threading.get_ident(), threading.current_thread().name))
            self.preparing.add(rawsql.preparing())
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.02)
        with self._lock:
            self.running -= 1

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await sync_to_async(self._work)()
        await send({"type": scope["type"], "thread": threading.current_thread().name})


def test_requests_share_a_few_long_lived_threads_and_other_scopes_pass_through() -> None:
    app = _RecordingApp()
    threads = RequestThreads(app, THREADS, prepare=True)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def main() -> None:
        await asyncio.gather(*[threads({"type": "http"}, receive, send) for _ in range(4 * THREADS)])
        await asyncio.gather(*[threads({"type": "http"}, receive, send) for _ in range(4 * THREADS)])
        await threads({"type": "websocket"}, receive, send)

    asyncio.run(main())
    assert len(sent) == 8 * THREADS + 1
    assert len(app.threads) == THREADS and all(name.startswith("request-") for _, name in app.threads)
    assert app.most_at_once == THREADS  # the rest waited for a free thread
    # Keeping their connections, the threads prepare the statements requests run (on PostgreSQL,
    # unless prepared statements are turned off).
    assert app.preparing == {connection.vendor == "postgresql" and settings.RUNWARDEN_PREPARED_STATEMENTS}
    assert sent[-1]["type"] == "websocket"
    with pytest.raises(ValueError):
        RequestThreads(app, 0)


def _web_env(threads: int) -> dict[str, str]:
    return base_env(
        DEBUG="0",
        SECRET_KEY="request-threads",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        RUNWARDEN_WEB_THREADS=str(threads),
    )


@pytest.mark.django_db(transaction=True)
def test_a_web_process_keeps_its_request_threads_connections(tmp_path: Path) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the embedded default's SQLite keeps its own connection settings")
    env = _web_env(threads=THREADS)

    def web_backends() -> set[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return {pid for (pid,) in cursor.fetchall()}

    before = web_backends()
    seen: set[int] = set()
    with console_server(env, tmp_path / "web.log") as base:
        for _ in range(12 * THREADS):  # /readyz reads the database
            with urllib.request.urlopen(f"{base}/readyz", timeout=10) as answer:
                assert answer.status == 200
            seen |= web_backends() - before
        after = web_backends() - before
    # One connection per request thread, kept: a connection per request would show 36.
    assert 1 <= len(seen) <= THREADS, seen
    assert after == seen


@pytest.mark.django_db(transaction=True)
def test_a_connection_is_checked_before_a_request_unless_it_served_one_a_moment_ago() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the embedded default's SQLite keeps its own connection settings")
    seen: dict[str, bool] = {}

    def request_cycle() -> None:  # on a thread of its own: its own connection, as a request thread
        own = connections[DEFAULT_DB_ALIAS]
        own.ensure_connection()
        try:
            own.health_check_done = False  # what Django's request_started receiver leaves
            request_threads._check_unless_recently_used()
            seen["first request"] = own.health_check_done  # nothing served yet: checked
            request_threads._note_last_use()
            own.health_check_done = False
            request_threads._check_unless_recently_used()
            seen["a moment later"] = own.health_check_done  # served one just now: not checked
            request_threads._last_use.at = time.monotonic() - request_threads.RECENTLY_USED_SECONDS - 0.1
            own.health_check_done = False
            request_threads._check_unless_recently_used()
            seen["after a pause"] = own.health_check_done
        finally:
            own.close()

    thread = threading.Thread(target=request_cycle)
    thread.start()
    thread.join(30)
    assert seen == {"first request": False, "a moment later": True, "after a pause": False}


@pytest.mark.django_db(transaction=True)
def test_a_request_after_a_pause_finds_its_broken_connection_replaced(tmp_path: Path) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the embedded default's SQLite keeps its own connection settings")
    env = _web_env(threads=1)
    with console_server(env, tmp_path / "web.log") as base:
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as answer:
            assert answer.status == 200
        with connection.cursor() as cursor:  # as a restart of PostgreSQL would: its backend goes
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert cursor.fetchall(), "the web process's connection"
        time.sleep(request_threads.RECENTLY_USED_SECONDS + 0.2)
        for _ in range(3):
            with urllib.request.urlopen(f"{base}/readyz", timeout=10) as answer:
                assert answer.status == 200


def _hops_through_the_loop(
    app: RequestThreads, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[str], list[str]]:
    """GET /healthz through ``app``: its status, each time its synchronous code handed control
    back to the event loop (``async_to_sync``), and the threads its middleware chain ran on."""
    hops: list[str] = []
    original = AsyncToSync.__call__

    def counted(self: AsyncToSync, *args: Any, **kwargs: Any) -> Any:
        hops.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncToSync, "__call__", counted)
    chain_threads: list[str] = []
    chain = app.app._middleware_chain

    def recorded(request: Any) -> Any:
        chain_threads.append(threading.current_thread().name)
        return chain(request)

    monkeypatch.setattr(
        app.app, "_middleware_chain", recorded if not asyncio.iscoroutinefunction(chain) else chain
    )
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"localhost")], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }  # fmt: skip

    received: list[str] = []

    async def receive() -> dict[str, Any]:
        if received:  # the client stays connected until the answer is sent
            await asyncio.Event().wait()
        received.append("request")
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], hops, chain_threads


def test_a_request_runs_its_middleware_and_view_on_its_thread_in_one_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, hops, chain_threads = _hops_through_the_loop(
        request_threads.http_application(2, prepare=True), monkeypatch
    )
    assert status == 200
    assert hops == []
    assert len(chain_threads) == 1 and chain_threads[0].startswith("request-")  # its kept connection
    # Django's own handler goes back to the loop between the middleware and the view.
    status, hops, _ = _hops_through_the_loop(RequestThreads(ASGIHandler(), 2), monkeypatch)
    assert status == 200
    assert hops
