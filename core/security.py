"""Accounts and browser security: the login throttle and the Content-Security-Policy.

The throttle counts login attempts per username (as Django normalizes it) and per client
address in Redis (shared by every web process; an in-process table in the embedded default),
each counted before the password is checked. Past the limit within the window, the login
answers 429 with Retry-After — so a guesser learns nothing more — until the window ends. A
successful login clears the username's count and is not held against the address. Both the
console's login and Django admin's are throttled.
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.template.response import TemplateResponse
from redis.exceptions import RedisError

from core.redis_client import get_redis
from core.validation import NUL_MESSAGE

_local_counts: dict[str, tuple[int, float]] = {}
_local_lock = threading.Lock()
logger = logging.getLogger(__name__)


def _client_address(request: HttpRequest) -> str:
    """The client's address: REMOTE_ADDR, or behind a proxy the first address of the header
    named by RUNWARDEN_CLIENT_IP_HEADER (e.g. HTTP_X_FORWARDED_FOR), which the proxy sets."""
    header = settings.RUNWARDEN_CLIENT_IP_HEADER
    forwarded = request.META.get(header, "") if header else ""
    address = forwarded.split(",")[0].strip() if forwarded else request.META.get("REMOTE_ADDR", "")
    return address[:64] or "unknown"


def _keys(request: HttpRequest, username: str) -> list[str]:
    # As Django's login form normalizes it (NFKC): "ｏｐｅｒａｔｏｒ" is "operator".
    name = unicodedata.normalize("NFKC", username).strip().casefold()[:150]
    return [f"runwarden:login-fail:user:{name}", f"runwarden:login-fail:addr:{_client_address(request)}"]


def _limits() -> tuple[int, int]:
    """Attempts allowed per username, and per address (a shared office or proxy: 4x)."""
    limit = settings.RUNWARDEN_LOGIN_FAILURE_LIMIT
    return limit, limit * 4


def login_attempt(request: HttpRequest, username: str) -> int:
    """Count this attempt before the password is checked (so a parallel burst cannot slip past
    a check), and return how long to refuse it (seconds), or 0 to let it through. Redis down:
    logins go on unthrottled rather than failing (logged)."""
    keys, limits = _keys(request, username), _limits()
    window = settings.RUNWARDEN_LOGIN_FAILURE_WINDOW
    client = get_redis()
    if client is not None:
        try:
            pipe = client.pipeline()
            for key in keys:
                pipe.incr(key)
                pipe.expire(key, window, nx=True)
                pipe.ttl(key)
            values = pipe.execute()
        except RedisError:
            logger.warning("login throttle unavailable (Redis): not throttling", exc_info=True)
            return 0
        counts, ttls = values[0::3], values[2::3]
        over = [
            max(int(ttl), 1)
            for count, ttl, limit in zip(counts, ttls, limits, strict=True)
            if int(count) > limit
        ]
        return max(over, default=0)
    now = time.monotonic()
    waits = [0]
    with _local_lock:
        for key, limit in zip(keys, limits, strict=True):
            count, until = _local_counts.get(key, (0, 0.0))
            count, until = (count + 1, until) if until > now else (1, now + window)
            _local_counts[key] = (count, until)
            if count > limit:
                waits.append(int(until - now) + 1)
    return max(waits)


def login_succeeded(request: HttpRequest, username: str) -> None:
    """A right password: the username's count starts again, and the attempt is not held against
    the address."""
    user_key, address_key = _keys(request, username)
    client = get_redis()
    if client is not None:
        try:
            pipe = client.pipeline()
            pipe.delete(user_key)
            pipe.decr(address_key)
            pipe.execute()
        except RedisError:
            logger.warning("login throttle unavailable (Redis)", exc_info=True)
        return
    with _local_lock:
        _local_counts.pop(user_key, None)
        count, until = _local_counts.get(address_key, (1, 0.0))
        _local_counts[address_key] = (max(count - 1, 0), until)


def throttled(login_view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """Wrap a login view (the console's, Django admin's): past the limits a POST answers 429
    with Retry-After, before the password is checked."""

    @wraps(login_view)
    def view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.method != "POST":
            return login_view(request, *args, **kwargs)
        username = str(request.POST.get("username", ""))
        retry_after = login_attempt(request, username)
        if retry_after:
            refused = TemplateResponse(
                request,
                "registration/login.html",
                {"form": AuthenticationForm(request), "throttled_for": retry_after, "next": ""},
                status=429,
            )
            refused["Retry-After"] = str(retry_after)
            return refused
        response = login_view(request, *args, **kwargs)
        if response.status_code == 302:
            login_succeeded(request, username)
        return response

    return view


class ThrottledLoginView(auth_views.LoginView):
    """Django's login, refused with 429 and Retry-After after repeated attempts."""

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Callable[..., HttpResponseBase]:
        return throttled(super().as_view(**initkwargs))


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
        api = request.path.startswith("/api/")
        if "\x00" in request.path:  # nothing is named with a NUL: not found
            if api:
                body = {"error": {"code": "not_found", "message": "Not found.", "details": {}}}
                return JsonResponse(body, status=404)
            return HttpResponse("Not found.", status=404, content_type="text/plain; charset=utf-8")
        values = [*request.GET.lists()]
        # Console forms only: the API reads its own bodies (parsing one here would consume it).
        if (
            not api
            and request.method == "POST"
            and request.content_type
            in (
                "application/x-www-form-urlencoded",
                "multipart/form-data",
            )
        ):
            values += [*request.POST.lists()]
        bad = sorted({key for key, vs in values if "\x00" in key or any("\x00" in v for v in vs)})
        if bad:
            message = "A NUL character is not allowed in a query or form value."
            if api:
                fields = {key.replace("\x00", "\\u0000"): NUL_MESSAGE for key in bad}
                body = {"error": {"code": "invalid_input", "message": message, "details": {"fields": fields}}}
                return JsonResponse(body, status=422)
            return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")
        return get_response(request)

    return middleware
