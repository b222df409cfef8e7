"""Accounts and browser security: the login throttle and the Content-Security-Policy.

The throttle counts failed logins per username and per client address in Redis (shared by
every web process; an in-process table in the embedded default). Past the limit within the
window, the login answers 429 with Retry-After — before checking the password, so a guesser
learns nothing more — until the window ends. A successful login clears the username's count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse

from core.redis_client import get_redis
from core.validation import NUL_MESSAGE

_local_counts: dict[str, tuple[int, float]] = {}
_local_lock = threading.Lock()


def _keys(request: HttpRequest, username: str) -> list[str]:
    address = request.META.get("REMOTE_ADDR", "") or "unknown"
    return [
        f"runwarden:login-fail:user:{username.strip().lower()[:150]}",
        f"runwarden:login-fail:addr:{address}",
    ]


def login_retry_after(request: HttpRequest, username: str) -> int:
    """Seconds until ``username`` (or this address) may try again; 0 when it may now."""
    keys = _keys(request, username)
    limits = _limits()
    client = get_redis()
    waits: list[int] = [0]
    if client is not None:
        pipe = client.pipeline()
        for key in keys:
            pipe.get(key)
            pipe.ttl(key)
        values = pipe.execute()
        for count, ttl, limit in zip(values[::2], values[1::2], limits, strict=True):
            if count is not None and int(count) >= limit:
                waits.append(max(int(ttl), 1))
        return max(waits)
    now = time.monotonic()
    with _local_lock:
        for key, limit in zip(keys, limits, strict=True):
            count, until = _local_counts.get(key, (0, 0.0))
            if until > now and count >= limit:
                waits.append(int(until - now) + 1)
    return max(waits)


def _limits() -> tuple[int, int]:
    """Failures allowed per username, and per address (a shared office or proxy: 4x)."""
    limit = settings.RUNWARDEN_LOGIN_FAILURE_LIMIT
    return limit, limit * 4


def login_failed(request: HttpRequest, username: str) -> None:
    window = settings.RUNWARDEN_LOGIN_FAILURE_WINDOW
    client = get_redis()
    if client is not None:
        pipe = client.pipeline()
        for key in _keys(request, username):
            pipe.incr(key)
            pipe.expire(key, window, nx=True)
        pipe.execute()
        return
    now = time.monotonic()
    with _local_lock:
        for key in _keys(request, username):
            count, until = _local_counts.get(key, (0, 0.0))
            _local_counts[key] = (count + 1, until) if until > now else (1, now + window)


def login_succeeded(request: HttpRequest, username: str) -> None:
    key = _keys(request, username)[0]
    client = get_redis()
    if client is not None:
        client.delete(key)
        return
    with _local_lock:
        _local_counts.pop(key, None)


class ThrottledLoginView(auth_views.LoginView):
    """Django's login, refused with 429 and Retry-After after repeated failures."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        username = str(request.POST.get("username", ""))
        retry_after = login_retry_after(request, username)
        if retry_after:
            refused = TemplateResponse(
                request,
                "registration/login.html",
                {**self.get_context_data(form=self.get_form()), "throttled_for": retry_after},
                status=429,
            )
            refused["Retry-After"] = str(retry_after)
            return refused
        response: HttpResponse = super().post(request, *args, **kwargs)
        if response.status_code == 302:
            login_succeeded(request, username)
        else:
            login_failed(request, username)
        return response


# No inline script (htmx runs with allowEval off; no hx-on), no framing, nothing from
# elsewhere. Same-origin websockets are covered by 'self'.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        # Inline style attributes (Django's admin sets some, htmx settles them) carry no code.
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


def security_headers_middleware(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[..., HttpResponse]:
    def middleware(request: HttpRequest) -> HttpResponse:
        response = get_response(request)
        # The interactive API docs load their own inline bootstrap; everything else is strict.
        if not request.path.startswith("/api/v1/docs"):
            response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        response.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
        return response

    return middleware


def refuse_nul_characters_middleware(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[..., HttpResponse]:
    """A NUL character in any query or form value is refused before any view runs (the API's
    422 ``invalid_input`` naming the fields, a console page's 400): PostgreSQL
    cannot store or even compare it, so no filter, cursor or form field may carry one.
    (JSON bodies are checked by the API's schemas, field by field.)"""

    def middleware(request: HttpRequest) -> HttpResponse:
        values = [*request.GET.lists()]
        if request.method == "POST" and request.content_type in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            values += [*request.POST.lists()]
        bad = sorted({key for key, vs in values if "\x00" in key or any("\x00" in v for v in vs)})
        if bad:
            message = "A NUL character is not allowed in a query or form value."
            if request.path.startswith("/api/"):
                fields = {key.replace("\x00", "\\u0000"): NUL_MESSAGE for key in bad}
                body = {"error": {"code": "invalid_input", "message": message, "details": {"fields": fields}}}
                return JsonResponse(body, status=422)
            return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")
        return get_response(request)

    return middleware
