"""API (v1) for a tenant's environments and connections: admins only. Secrets go in, never
out: a connection answers with where its secret comes from (``secret_source``), not the secret."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Field, Router, Schema, Status

from core import connections, selectors
from core.api import ApiError, InputSchema, request_user
from core.models import Connection, Role

router = Router(tags=["environments and connections"])


class EnvironmentIn(InputSchema):
    name: str = Field(min_length=1, max_length=64)


class ConnectionIn(InputSchema):
    environment: str = Field(min_length=1, max_length=64)
    provider: str = Field(min_length=1, max_length=64, description="crm, messaging, payments, ...")
    name: str = Field(min_length=1, max_length=64)
    is_default: bool = False
    secret: str | None = Field(default=None, max_length=4096, description="stored encrypted, never shown")
    secret_ref: str | None = Field(default=None, max_length=140, description="env:NAME, read by the workers")
    config: dict[str, Any] = Field(default_factory=dict, description="settings that are not secret")


class ConnectionPatch(InputSchema):
    is_default: bool | None = None
    secret: str | None = Field(default=None, max_length=4096)
    secret_ref: str | None = Field(default=None, max_length=140)
    config: dict[str, Any] | None = None
    archived: bool | None = None


class ConnectionOut(Schema):
    id: int
    environment: str
    provider: str
    name: str
    is_default: bool
    secret_source: str = Field(description="env:NAME, encrypted or none; the secret itself is never shown")
    config: dict[str, Any]
    created_by: str
    created_at: datetime
    archived_at: datetime | None


def _connection_out(connection: Connection) -> dict[str, Any]:
    return {
        "id": connection.pk,
        "environment": connection.environment,
        "provider": connection.provider,
        "name": connection.name,
        "is_default": connection.is_default,
        "secret_source": connection.secret_source,
        "config": connection.config,
        "created_by": connection.created_by,
        "created_at": connection.created_at,
        "archived_at": connection.archived_at,
    }


def _invalid(exc: connections.ConnectionInvalid) -> ApiError:
    return ApiError(422, "invalid_input", str(exc), {"fields": exc.fields})


@router.get("/tenants/{slug}/environments", response=list[str])
def environment_list(request: HttpRequest, slug: str) -> list[str]:
    tenant = selectors.get_tenant_for_user(request_user(request), slug, role=Role.ADMIN)
    return connections.environment_names(tenant)


@router.post("/tenants/{slug}/environments", response={201: list[str]})
def environment_add(request: HttpRequest, slug: str, payload: EnvironmentIn) -> Status[list[str]]:
    user = request_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    try:
        connections.environment_add(tenant=tenant, name=payload.name, actor=user.get_username())
    except connections.ConnectionInvalid as exc:
        raise _invalid(exc) from None
    return Status(201, connections.environment_names(tenant))


@router.get("/tenants/{slug}/connections", response=list[ConnectionOut])
def connection_list(request: HttpRequest, slug: str) -> list[dict[str, Any]]:
    tenant = selectors.get_tenant_for_user(request_user(request), slug, role=Role.ADMIN)
    rows = Connection.objects.filter(tenant=tenant).order_by("environment", "provider", "name")
    return [_connection_out(c) for c in rows]


@router.post("/tenants/{slug}/connections", response={201: ConnectionOut})
def connection_add(request: HttpRequest, slug: str, payload: ConnectionIn) -> Status[dict[str, Any]]:
    user = request_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    try:
        created = connections.connection_add(
            tenant=tenant,
            environment=payload.environment,
            provider=payload.provider,
            name=payload.name,
            actor=user.get_username(),
            is_default=payload.is_default,
            secret=payload.secret,
            secret_ref=payload.secret_ref,
            config=payload.config,
        )
    except connections.ConnectionInvalid as exc:
        raise _invalid(exc) from None
    return Status(201, _connection_out(created))


@router.patch("/tenants/{slug}/connections/{connection_id}", response=ConnectionOut)
def connection_change(
    request: HttpRequest, slug: str, connection_id: int, payload: ConnectionPatch
) -> dict[str, Any]:
    """Make a connection the default, rotate its secret, change its config or archive it. Runs
    already started keep the connections they bound."""
    user = request_user(request)
    tenant = selectors.get_tenant_for_user(user, slug, role=Role.ADMIN)
    connection = get_object_or_404(Connection, pk=connection_id, tenant=tenant)
    try:
        changed = connections.connection_update(
            connection=connection, actor=user.get_username(), **payload.model_dump(exclude_unset=True)
        )
    except connections.ConnectionInvalid as exc:
        raise _invalid(exc) from None
    return _connection_out(changed)
