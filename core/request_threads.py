"""The web process's request threads: a few long-lived threads, each keeping its database
connection, on which every HTTP request's synchronous code runs.

Under ASGI, Django runs a request's middleware and view (synchronous code) on a thread of their
own: its handler gives each request a new asgiref ``ThreadSensitiveContext``, and with it a new
thread. Database connections belong to threads, so every request also opened a connection and
closed it at the end — about half of an authenticated API call's time here. ``RequestThreads``
lends each request one of ``size`` single-thread executors instead (asgiref's
``ThreadSensitiveContext(executor=...)``, made for this), so a request runs on a thread that
served requests before and finds its connection open: the web process holds at most ``size``
connections (``RUNWARDEN_WEB_THREADS``), kept ``RUNWARDEN_WEB_CONN_MAX_AGE`` seconds and checked
before a request's first query (``CONN_HEALTH_CHECKS``) when the thread's last request ended
more than ``RECENTLY_USED_SECONDS`` ago, so one broken by a restart of PostgreSQL is replaced
rather than failing the request (a busy thread's connection, used a moment ago, is not checked:
that round trip was a tenth of a busy web process's time). A request waits for a free thread
when all are busy; websockets (Channels' consumers) are not affected. Keeping its connection, a
request thread also prepares the hand-written statements its requests run (``core.rawsql``),
as a worker does: PostgreSQL plans each once per connection, not on every request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from core import rawsql

Scope = dict[str, Any]


# A connection whose last request ended this recently is taken as healthy without a check.
RECENTLY_USED_SECONDS = 1.0


def keep_request_connections(max_age: int) -> None:
    """The web process keeps each request thread's connection ``max_age`` seconds (PostgreSQL:
    the embedded default's SQLite keeps its own settings), checked before a request uses it
    unless it served a request a moment ago."""
    settings = connections.settings[DEFAULT_DB_ALIAS]
    if settings["ENGINE"].endswith("postgresql"):
        settings["CONN_MAX_AGE"] = max_age
        settings["CONN_HEALTH_CHECKS"] = True
        # After Django's own receivers (connected at import), on the request's thread.
        request_started.connect(_check_unless_recently_used, dispatch_uid="runwarden-recently-used")
        request_finished.connect(_note_last_use, dispatch_uid="runwarden-last-use")


# When this thread's connection last finished a request (connections belong to threads).
_last_use = threading.local()


def _check_unless_recently_used(**_: Any) -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    last_use = getattr(_last_use, "at", None)
    if (
        connection.connection is not None
        and last_use is not None
        and time.monotonic() - last_use < RECENTLY_USED_SECONDS
    ):
        connection.health_check_done = True  # type: ignore[attr-defined]  # Django 4.1+, not in the stubs


def _note_last_use(**_: Any) -> None:
    # Django's receiver, before this one, closed the connection if the request left it broken.
    open_now = connections[DEFAULT_DB_ALIAS].connection is not None
    _last_use.at = time.monotonic() if open_now else None


class SyncChainASGIHandler(ASGIHandler):
    """Django's ASGI handler, its middleware chain and views run in one go on the request's
    thread. Django's own builds the chain for the event loop: with every middleware and view
    synchronous, a request went thread → loop → thread → loop between them (``async_to_sync``
    under the innermost middleware, ``sync_to_async`` around the view), each hop a wait for the
    loop, which serves every other request too. Nothing here is asynchronous: no async view or
    middleware (the websockets are Channels' consumers, not Django views)."""

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        # The request thread: RequestThreads' context makes thread-sensitive calls go there.
        response: HttpResponseBase = await sync_to_async(self.get_response, thread_sensitive=True)(request)
        return response


def http_application(threads: int, *, prepare: bool) -> RequestThreads:
    """The web process's HTTP application: Django, a request at a time on each request thread.
    ``prepare``: the threads keep their connections, so they prepare their statements."""
    return RequestThreads(SyncChainASGIHandler(), threads, prepare=prepare)


class RequestThreads:
    """ASGI middleware: each HTTP request runs on one of ``size`` long-lived threads."""

    def __init__(self, app: Any, size: int, *, prepare: bool = False) -> None:
        if size < 1:
            raise ValueError("the web process needs at least one request thread")
        self.app = app
        self.size = size
        # A thread keeping its connection plans the statements its requests run by
        # ``execute_prepared`` once on it; with a new connection per request, that would
        # only add a PREPARE to each.
        self.prepare = prepare
        self._free: asyncio.Queue[ThreadPoolExecutor] | None = None

    def _threads(self) -> asyncio.Queue[ThreadPoolExecutor]:
        # Made on the first request, inside the server's event loop.
        if self._free is None:
            self._free = asyncio.Queue()
            for n in range(self.size):
                self._free.put_nowait(
                    ThreadPoolExecutor(
                        max_workers=1,
                        thread_name_prefix=f"request-{n}",
                        initializer=rawsql.prepare_on_this_thread if self.prepare else None,
                    )
                )
        return self._free

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        free = self._threads()
        executor = await free.get()
        try:
            # The outermost context decides: Django's own (without an executor) defers to it.
            async with ThreadSensitiveContext(executor=executor):
                await self.app(scope, receive, send)
        finally:
            free.put_nowait(executor)
