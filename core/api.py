"""The v1 HTTP API object, its authentication and its error shape.

Every error answers ``{"error": {"code", "message", "details"}}`` with a fitting status.
Routers of the other apps are added to ``api`` in ``core/urls.py`` (a wiring file).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI, Router, Schema
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.security import HttpBearer, django_auth
from pydantic import Field

from core import selectors, services
from core.models import Role, User


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
    def authenticate(self, request: HttpRequest, token: str) -> User | None:
        user = services.api_token_authenticate(token)
        if user is not None:
            request.user = user
        return user


api = NinjaAPI(
    title="Runwarden API",
    version="1",
    urls_namespace="api-v1",
    auth=[BearerTokenAuth(), django_auth],
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
    response = api.create_response(
        request, {"error": {"code": code, "message": message, "details": details or {}}}, status=status
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


@api.exception_handler(ApiError)
def _api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return error_response(request, exc.status, exc.code, exc.message, exc.details, exc.headers)


@api.exception_handler(AuthenticationError)
def _unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(
        request,
        401,
        "unauthenticated",
        "Authentication required: send 'Authorization: Bearer <token>' or log in.",
        headers={"WWW-Authenticate": 'Bearer realm="runwarden"'},
    )


@api.exception_handler(NinjaValidationError)
def _invalid(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    return error_response(
        request, 400, "invalid_request", "The request is not valid.", {"errors": exc.errors}
    )


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(request, 404, "not_found", str(exc) or "Not found.")


@api.exception_handler(PermissionDenied)
def _forbidden(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    return error_response(request, 403, "forbidden", str(exc) or "Forbidden.")


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return error_response(request, exc.status_code, "error", str(exc))


def request_user(request: HttpRequest) -> User:
    user = request.user
    assert isinstance(user, User), "API handlers run only for authenticated users"
    return user


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


class QuotaIn(Schema):
    max_concurrent_steps: int | None = Field(default=None, ge=1, le=100_000)
    max_queue_depth: int | None = Field(default=None, ge=1, le=10_000_000)
    weight: int | None = Field(default=None, ge=1, le=1000)


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
    }


@core_router.get("/tenants/{slug}/quota", response=QuotaOut)
def quota_get(request: HttpRequest, slug: str) -> dict[str, Any]:
    tenant = selectors.get_tenant_for_user(request_user(request), slug, role=Role.ADMIN)
    return _quota_out(slug, selectors.quota_for_tenant(tenant))


@core_router.put("/tenants/{slug}/quota", response=QuotaOut)
def quota_put(request: HttpRequest, slug: str, payload: QuotaIn) -> dict[str, Any]:
    user = request_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    changes = payload.model_dump(exclude_none=True)
    if not changes:
        raise ApiError(
            400, "invalid_request", "Send at least one of max_concurrent_steps, max_queue_depth, weight."
        )
    quota = services.tenant_quota_update(tenant=tenant, actor=user, changes=changes)
    return _quota_out(slug, quota)


api.add_router("/", core_router)
