"""The request id: every request gets one, every answer names it, every log line carries it."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.utils.http import url_has_allowed_host_and_scheme

from core.db_errors import is_transient_conflict
from core.logs import request_id_bind, request_id_unbind

logger = logging.getLogger(__name__)

# What we accept from a proxy or client as its own id: short, and safe to echo in a header and
# to write into a log line. Anything else is replaced, not cleaned up.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
CONCURRENT_UPDATE_MESSAGE = (
    "Someone else changed this at the same moment, so nothing was saved: here is the page as it is "
    "now; try again if it still applies."
)
INTERNAL_ERROR_MESSAGE = "The server failed to answer this request. Quote the request_id when reporting it."


def request_id_middleware(
    get_response: Callable[[HttpRequest], HttpResponse],
) -> Callable[[HttpRequest], HttpResponse]:
    """First in MIDDLEWARE. Takes the incoming ``X-Request-ID`` when it is a sane short token,
    else makes one; log lines written while the request is answered carry it (``core.logs``),
    and the answer names it in ``X-Request-ID``.

    A 5xx under /api/ that is not JSON yet (an exception outside the API's handlers, turned
    into Django's HTML page) is answered in the API's error shape with the id instead; the
    API's own handlers answer theirs themselves (``core.api``)."""

    def middleware(request: HttpRequest) -> HttpResponse:
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        request.request_id = request_id  # type: ignore[attr-defined]
        token = request_id_bind(request_id)
        try:
            response = get_response(request)
        finally:
            request_id_unbind(token)
        if (
            response.status_code >= 500
            and request.path.startswith("/api/")
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            response = server_error_response(request_id, response.status_code)
        response["X-Request-ID"] = request_id
        return response

    return middleware


def server_error_response(request_id: str, status: int = 500) -> JsonResponse:
    # Django has logged the exception (with this id) before its HTML page got here.
    body = {
        "error": {
            "code": "internal_error",
            "message": INTERNAL_ERROR_MESSAGE,
            "details": {"request_id": request_id},
        }
    }
    return JsonResponse(body, status=status)


class ConcurrentUpdateMiddleware:
    """The console's answer when PostgreSQL aborts a page's write as a deadlock or serialization
    failure even after the service's one retry (``core.transactions``): nothing was saved, and
    the person sees the page as it is now with a sentence to act on — an htmx request reloads
    it (409 with ``HX-Refresh``), a plain form goes back to where it came from (303) — never a
    500 page. The API answers its own (``core.api``)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not is_transient_conflict(exception):
            return None
        logger.warning("concurrent update on %s; nothing was saved", request.path, exc_info=exception)
        messages.warning(request, CONCURRENT_UPDATE_MESSAGE)
        if request.headers.get("HX-Request"):
            response = HttpResponse(CONCURRENT_UPDATE_MESSAGE, status=409, content_type="text/plain")
            response["HX-Refresh"] = "true"
            return response
        back = request.headers.get("Referer", "")
        if not url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}):
            back = "/"
        return HttpResponseRedirect(back, status=303)
