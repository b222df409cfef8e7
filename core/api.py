"""The v1 HTTP API object, its authentication and its error shape.

Every error answers ``{"error": {"code", "message", "details"}}`` with a fitting status:
a body that is not JSON is a 400 ``malformed_json``, one over DATA_UPLOAD_MAX_MEMORY_SIZE a 413
``payload_too_large``, a request that does not fit its schema a 422 ``invalid_input`` with
``details.fields`` ({dotted path: message}). Never a 500 for input. A deadlock or serialization
failure that escapes a service is a 409 ``concurrent_update`` (re-read and retry); anything else
unexpected is a 500 ``internal_error`` whose ``details.request_id`` names the log line with the
traceback (and the ``X-Request-ID`` header).

Authentication: a request with an ``Authorization`` header is judged by its Bearer token alone
(401 for a missing, bad, expired or revoked one, or another scheme), never by the session and so
never by the CSRF check; a request without one by its browser session, CSRF-checked for writes.
Routers of the other apps are added to ``api`` in ``core/urls.py`` (a wiring file).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal

from django.conf import settings
from django.core import signals
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from django.utils.log import log_response
from ninja import NinjaAPI, Path, Query, Router, Schema, Status
from ninja.errors import AuthenticationError, HttpError, ValidationErrorContext
from ninja.errors import ValidationError as NinjaValidationError
from ninja.security import HttpBearer
from ninja.security import SessionAuth as NinjaSessionAuth
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from core import selectors, services
from core.db_errors import is_transient_conflict
from core.logs import current_request_id
from core.middleware import INTERNAL_ERROR_MESSAGE
from core.models import Membership, Role, User
from core.validation import NON_FIELD, NUL_MESSAGE, dotted_path

request_logger = logging.getLogger("django.request")


class ApiError(Exception):
    """Raise from an API handler to answer with DESIGN.md's error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


class BearerTokenAuth(HttpBearer):
    """``Authorization: Bearer <token>``. A request that sends an Authorization header is
    judged here and only here: a missing, bad, expired or revoked token, or another scheme, is
    a 401 at once. Returning None instead would hand the request to session auth, whose CSRF
    check refuses a token client's write with a 403 about CSRF (and would let a browser's
    session answer for a token that was refused)."""

    def __call__(self, request: HttpRequest) -> User | None:
        header = request.headers.get("Authorization")
        if header is None:
            return None  # not a token request: the session decides
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationError()
        return self.authenticate(request, token.strip())

    def authenticate(self, request: HttpRequest, token: str) -> User:
        found = services.api_token_find(token) if token else None
        if found is None:
            raise AuthenticationError()
        request.user = found.user
        request.api_token_environment = found.environment  # type: ignore[attr-defined]
        return found.user


class SessionAuth(NinjaSessionAuth):
    """The browser's Django session, CSRF-checked for writes (ninja's). A request with an
    Authorization header is no session request: refused with 401 before any CSRF check, on a
    route that takes no token (behind ``BearerTokenAuth``, such a request never gets here).
    Named as ninja's, so the OpenAPI document names one session scheme."""

    def __call__(self, request: HttpRequest) -> Any:
        if "Authorization" in request.headers:
            raise ApiError(
                401,
                "unauthenticated",
                "This route takes a browser session, not an API token.",
                headers={"WWW-Authenticate": 'Bearer realm="runwarden"'},
            )
        return super().__call__(request)


class RunwardenAPI(NinjaAPI):
    def validation_error_from_error_contexts(
        self, error_contexts: list[ValidationErrorContext[Any]]
    ) -> NinjaValidationError:
        """ninja's errors, with the name of a single body schema parameter left out of ``loc``:
        ("body", "payload", "input") -> ("body", "input"), the field as the client sent it."""
        errors: list[dict[str, Any]] = []
        for context in error_contexts:
            single = getattr(context.model, "__read_from_single_attr__", None)
            for error in super().validation_error_from_error_contexts([context]).errors:
                loc = tuple(error["loc"])
                if single and loc[1:2] == (single,):
                    error["loc"] = loc[:1] + loc[2:]
                errors.append(error)
        return NinjaValidationError(errors)


api = RunwardenAPI(
    title="Runwarden API",
    version="1",
    urls_namespace="api-v1",
    auth=[BearerTokenAuth(), SessionAuth()],
    docs_url="/docs",
    openapi_url="/openapi.json",
)


def error_response(
    request: HttpRequest,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    details = details or {}
    if status >= 500:
        details = {**details, "request_id": current_request_id()}
    response = api.create_response(
        request, {"error": {"code": code, "message": message, "details": details}}, status=status
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


@api.exception_handler(ApiError)
def _api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return error_response(request, exc.status, exc.code, exc.message, exc.details, exc.headers)


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    """Any exception no more specific handler takes (ninja picks by class). Logged here with
    its traceback and the request's id, as Django would log it (so Django does not log the
    answer a second time)."""
    if is_transient_conflict(exc):
        # The service's transaction was rolled back whole: nothing changed, and the same request
        # sent again meets the data as it is now. A warning: the lock order (DESIGN.md) should
        # make this rare, and the traceback says which statements met.
        response = error_response(
            request,
            409,
            "concurrent_update",
            "Another request changed the same data at the same moment and nothing was changed; "
            "re-read it and retry.",
        )
        log_response(
            "Concurrent update: %s",
            request.path,
            response=response,
            request=request,
            logger=request_logger,
            level="warning",
            exception=exc,
        )
        return response
    # As Django's own handler does: listeners such as the test client hear of the exception.
    signals.got_request_exception.send(sender=None, request=request)
    response = error_response(request, 500, "internal_error", INTERNAL_ERROR_MESSAGE)
    log_response(
        "%s: %s",
        response.reason_phrase,
        request.path,
        response=response,
        request=request,
        logger=request_logger,
        exception=exc,
    )
    return response


@api.exception_handler(AuthenticationError)
def _unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(
        request,
        401,
        "unauthenticated",
        "Authentication required: send 'Authorization: Bearer <token>' or log in.",
        headers={"WWW-Authenticate": 'Bearer realm="runwarden"'},
    )


def error_fields(errors: list[dict[str, Any]]) -> dict[str, str]:
    """ninja's errors as {dotted path: message}, the path without its source ("body", "query");
    several messages for one path are joined."""
    fields: dict[str, str] = {}
    for error in errors:
        path = dotted_path(error["loc"][1:])
        message = error["msg"]
        if error["loc"][:1] == ("body",) and path == NON_FIELD and error.get("type") == "missing":
            message = "a JSON body is required (send {} when every field is optional)"
        fields[path] = f"{fields[path]}; {message}" if path in fields else message
    return fields


@api.exception_handler(NinjaValidationError)
def _invalid(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    return error_response(
        request,
        422,
        "invalid_input",
        "The request does not fit its schema.",
        {"fields": error_fields(exc.errors)},
    )


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(request, 404, "not_found", str(exc) or "Not found.")


@api.exception_handler(PermissionDenied)
def _forbidden(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    return error_response(request, 403, "forbidden", str(exc) or "Forbidden.")


@api.exception_handler(RequestDataTooBig)
def _too_large(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    # Raised when ninja first reads request.body; unhandled, Django would answer an HTML 400.
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return error_response(
        request,
        413,
        "payload_too_large",
        f"The request body is larger than the limit of {limit} bytes.",
        {"limit_bytes": limit},
    )


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # ninja answers a body it cannot parse with HttpError(400), the parser's error as its cause.
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, ValueError):  # JSONDecodeError, UnicodeDecodeError
        return error_response(request, 400, "malformed_json", f"The request body is not valid JSON: {cause}")
    return error_response(request, exc.status_code, "error", str(exc))


def request_environment(request: HttpRequest, asked: str) -> str:
    """The environment a request acts in: the one it names, else the one its API token was
    issued for; a browser session that names none acts in production."""
    return asked or getattr(request, "api_token_environment", "") or "production"


def request_user(request: HttpRequest) -> User:
    user = request.user
    assert isinstance(user, User), "API handlers run only for authenticated users"
    return user


class InputSchema(Schema):
    """A request schema whose strings PostgreSQL can store: a NUL character in any string field
    is a 422 for that field, not a database error. Nested values are the handler's to check."""

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_characters(cls, value: Any) -> Any:
        if isinstance(value, str) and "\x00" in value:
            raise PydanticCustomError("nul_character", NUL_MESSAGE)
        return value


class MembershipOut(Schema):
    tenant: str
    role: str


class MeOut(Schema):
    username: str
    memberships: list[MembershipOut]


class QuotaOut(Schema):
    tenant: str
    max_concurrent_steps: int
    max_queue_depth: int
    weight: int
    caps: dict[str, dict[str, int]] = Field(
        description="the tenant's own caps per workflow, lane and tool: {kind: {name: cap}}"
    )
    platform_caps: dict[str, Any] = Field(description="the platform's caps, which apply as well")
    cap_names: dict[str, list[str]] = Field(description="what a cap may be put on: {kind: [names]}")
    deadlock_policy: str = Field(
        description="which mid-step lock wait gives way when waits form a cycle, for workflows "
        "that declare none: kill_youngest_waiter | kill_oldest_waiter"
    )


class QuotaIn(InputSchema):
    max_concurrent_steps: int | None = Field(
        default=None, ge=1, le=services.QUOTA_LIMITS["max_concurrent_steps"]
    )
    max_queue_depth: int | None = Field(default=None, ge=1, le=services.QUOTA_LIMITS["max_queue_depth"])
    weight: int | None = Field(default=None, ge=1, le=services.QUOTA_LIMITS["weight"])
    # Checked by the service (whole numbers only, known names), which names each bad field.
    caps: dict[str, Any] | None = Field(
        default=None,
        description="merged into the current caps: {kind: {name: cap}}; a null cap removes it",
    )
    deadlock_policy: Literal["kill_youngest_waiter", "kill_oldest_waiter"] | None = None

    @field_validator("max_concurrent_steps", "max_queue_depth", "weight", mode="before")
    @classmethod
    def _whole_numbers_only(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise PydanticCustomError("int_type", "must be a whole number")
        return value


core_router = Router(tags=["core"])


@core_router.get("/me", response=MeOut)
def me(request: HttpRequest) -> dict[str, Any]:
    user = request_user(request)
    return {
        "username": user.get_username(),
        "memberships": [
            {"tenant": m.tenant.slug, "role": m.role} for m in selectors.memberships_for_user(user)
        ],
    }


def _quota_out(slug: str, quota: Any) -> dict[str, Any]:
    return {
        "tenant": slug,
        "max_concurrent_steps": quota.max_concurrent_steps,
        "max_queue_depth": quota.max_queue_depth,
        "weight": quota.weight,
        "caps": quota.caps or {},
        "platform_caps": settings.RUNWARDEN_CAPS,
        "cap_names": services.quota_cap_names(),
        "deadlock_policy": quota.deadlock_policy,
    }


@core_router.get("/tenants/{slug}/quota", response=QuotaOut)
def quota_get(request: HttpRequest, slug: str) -> dict[str, Any]:
    tenant = selectors.get_tenant_for_user(request_user(request), slug, role=Role.ADMIN)
    return _quota_out(slug, selectors.quota_for_tenant(tenant))


@core_router.put("/tenants/{slug}/quota", response=QuotaOut)
def quota_put(request: HttpRequest, slug: str, payload: QuotaIn) -> dict[str, Any]:
    """Change any of the tenant's caps; fields left out keep their value. The next admission
    round applies the change."""
    user = request_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    changes = payload.model_dump(exclude_none=True)
    if not changes:
        raise ApiError(
            400,
            "invalid_request",
            "Send at least one of max_concurrent_steps, max_queue_depth, weight, caps, deadlock_policy.",
        )
    try:
        quota = services.tenant_quota_update(tenant=tenant, actor=user, changes=changes)
    except services.QuotaInvalid as invalid:
        raise ApiError(
            422, "invalid_input", "The quota change does not fit.", {"fields": invalid.fields}
        ) from invalid
    return _quota_out(slug, quota)


class MemberOut(Schema):
    username: str
    email: str
    role: str
    since: datetime


class MemberIn(InputSchema):
    username: str = Field(min_length=1, max_length=150)
    role: Role
    email: str = Field(default="", max_length=254)
    password: str = Field(default="", max_length=128, description="only to create a new account")


class MemberRoleIn(InputSchema):
    role: Role


def _member_out(membership: Membership) -> dict[str, Any]:
    return {
        "username": membership.user.get_username(),
        "email": membership.user.email,
        "role": membership.role,
        "since": membership.created_at,
    }


def _membership_error(invalid: services.MembershipInvalid) -> ApiError:
    return ApiError(invalid.status, invalid.code, str(invalid))


@core_router.get("/tenants/{slug}/members", response=list[MemberOut])
def members_list(request: HttpRequest, slug: str) -> list[dict[str, Any]]:
    tenant = selectors.get_tenant_for_user(request_user(request), slug, role=Role.ADMIN)
    return [_member_out(m) for m in selectors.members_of_tenant(tenant)]


@core_router.post("/tenants/{slug}/members", response={201: MemberOut})
def members_add(request: HttpRequest, slug: str, payload: MemberIn) -> Status:
    """Give a user a role in the tenant; an unknown username is a new account (with password)."""
    actor = request_user(request)
    tenant = selectors.get_tenant_for_user(actor, slug, role=Role.ADMIN)
    try:
        membership = services.membership_add(tenant=tenant, actor=actor, **payload.model_dump())
    except services.MembershipInvalid as invalid:
        raise _membership_error(invalid) from invalid
    return Status(201, _member_out(membership))


@core_router.patch("/tenants/{slug}/members/{username}", response=MemberOut)
def members_set_role(request: HttpRequest, slug: str, username: str, payload: MemberRoleIn) -> dict[str, Any]:
    actor = request_user(request)
    tenant = selectors.get_tenant_for_user(actor, slug, role=Role.ADMIN)
    member = selectors.member_user(tenant, username)
    try:
        membership = services.membership_set_role(tenant=tenant, actor=actor, user=member, role=payload.role)
    except services.MembershipInvalid as invalid:
        raise _membership_error(invalid) from invalid
    return _member_out(membership)


@core_router.delete("/tenants/{slug}/members/{username}", response={204: None})
def members_remove(request: HttpRequest, slug: str, username: str) -> Status:
    actor = request_user(request)
    tenant = selectors.get_tenant_for_user(actor, slug, role=Role.ADMIN)
    member = selectors.member_user(tenant, username)
    try:
        services.membership_revoke(tenant=tenant, user=member, actor=actor)
    except services.MembershipInvalid as invalid:
        raise _membership_error(invalid) from invalid
    return Status(204, None)


class EventOut(Schema):
    id: int
    created_at: datetime
    actor: str
    verb: str
    subject: str
    payload: dict[str, Any]


class EventPage(Schema):
    items: list[EventOut]
    next_before: int | None


@core_router.get("/tenants/{slug}/events", response=EventPage)
def tenant_events(
    request: HttpRequest,
    slug: str,
    actor: str = Query("", max_length=200),
    verb: str = Query("", max_length=64),
    subject: str = Query("", max_length=200, description="prefix, e.g. run: or user:ann"),
    before: int | None = Query(None, ge=1, le=2**62, description="the next_before of the previous page"),
) -> dict[str, Any]:
    """The tenant's audit log, newest first (admins)."""
    tenant = selectors.get_tenant_for_user(request_user(request), slug, role=Role.ADMIN)
    events, next_before = selectors.tenant_events(
        tenant, actor=actor, verb=verb, subject=subject, before=before
    )
    return {
        "items": [
            {
                "id": e.pk,
                "created_at": e.created_at,
                "actor": e.actor,
                "verb": e.verb,
                "subject": e.subject,
                "payload": e.payload,
            }
            for e in events
        ],
        "next_before": next_before,
    }


class TokenOut(Schema):
    id: int
    name: str
    prefix: str
    environment: str
    state: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenIn(InputSchema):
    name: str = Field(default="", max_length=100)
    environment: str = Field(default="production", max_length=64)
    days: int | None = Field(
        default=None, ge=1, description="until it expires (default and maximum by settings)"
    )


class TokenCreated(TokenOut):
    token: str = Field(description="the secret: shown this once, never again")


def _token_out(token: Any) -> dict[str, Any]:
    return {
        "id": token.pk,
        "name": token.name,
        "prefix": token.prefix,
        "environment": token.environment,
        "state": token.state,
        "created_at": token.created_at,
        "last_used_at": token.last_used_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
    }


@core_router.get("/tokens", response=list[TokenOut])
def tokens_list(request: HttpRequest) -> list[dict[str, Any]]:
    """Your API tokens (never their secrets), newest first."""
    return [_token_out(t) for t in selectors.tokens_of_user(request_user(request))]


@core_router.post("/tokens", response={201: TokenCreated}, auth=SessionAuth())
def tokens_create(request: HttpRequest, payload: TokenIn) -> Status:
    """Issue a token; its secret is in this answer only. Browser sessions only: a token cannot
    mint tokens, so a leaked one dies when it expires or is revoked."""
    user = request_user(request)
    try:
        token, raw = services.api_token_create(user=user, **payload.model_dump())
    except ValueError as refused:
        raise ApiError(422, "invalid_input", str(refused), {"fields": {"token": str(refused)}}) from refused
    return Status(201, {**_token_out(token), "token": raw})


@core_router.delete("/tokens/{token_id}", response={204: None})
def tokens_revoke(request: HttpRequest, token_id: int = Path(..., ge=1, le=2**62)) -> Status:
    """Revoke one of your tokens; it is refused from the next request on."""
    if not services.api_token_revoke(user=request_user(request), token_id=token_id):
        raise ApiError(404, "not_found", "No live token of yours has that id.")
    return Status(204, None)


api.add_router("/", core_router)
