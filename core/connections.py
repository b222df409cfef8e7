"""Environments and connections: which outside account a run talks to, decided at start.

A tenant has environments (``production`` and ``staging`` always; admins add more) and, per
environment and provider (``crm``, ``messaging``, ``payments``, ...), named connections, one
of them the default. Credentials are held by reference: ``env:NAME`` reads the worker's
environment variable when a step asks for it, or the secret is stored encrypted (Fernet, keyed
from ``RUNWARDEN_SECRETS_KEY`` or else ``SECRET_KEY``). Neither is ever shown back.

A run binds its connections when it starts (``connections_bind``): for each provider its
workflow declares, the connection named in the request or the environment's default. The
binding is frozen in the run (ids and names); a step reaches a connection only through
``ctx.connection(provider)``, which loads it by id *and* the run's tenant and environment, so a
run can never reach another tenant's or environment's connection, and changing a default
later moves no run already started.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from core import services as core_services
from core.models import BUILTIN_ENVIRONMENTS, Connection, Environment, Tenant
from core.validation import unstorable_values

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
ENV_REF_PATTERN = re.compile(r"env:[A-Z_][A-Z0-9_]{0,127}")


class ConnectionInvalid(ValueError):
    """A connection or environment request that cannot be honoured; ``fields`` says where."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


class ConnectionNotBound(LookupError):
    """A step asked for a provider its run has no connection for."""


def _fernet() -> Any:
    from cryptography.fernet import Fernet

    material = getattr(settings, "RUNWARDEN_SECRETS_KEY", "") or settings.SECRET_KEY
    key = base64.urlsafe_b64encode(hashlib.sha256(f"runwarden-connections:{material}".encode()).digest())
    return Fernet(key)


def encrypt_secret(secret: str) -> str:
    return str(_fernet().encrypt(secret.encode()).decode())


def decrypt_secret(token: str) -> str:
    return str(_fernet().decrypt(token.encode()).decode())


# Environments


def environment_names(tenant: Tenant | int) -> list[str]:
    """The tenant's environments: the built-in ones, then those its admins added."""
    tenant_id = tenant if isinstance(tenant, int) else tenant.pk
    added = Environment.objects.filter(tenant_id=tenant_id).order_by("name").values_list("name", flat=True)
    return [*BUILTIN_ENVIRONMENTS, *(name for name in added if name not in BUILTIN_ENVIRONMENTS)]


def environment_check(tenant: Tenant | int, name: str, *, field_name: str = "environment") -> str:
    """``name`` if it is one of the tenant's environments, else ConnectionInvalid (a 422)."""
    if name in BUILTIN_ENVIRONMENTS:  # every tenant has them: no query on the hot path
        return name
    known = environment_names(tenant)
    if name not in known:
        raise ConnectionInvalid(
            {field_name: f"unknown environment {name!r} (this tenant has: {', '.join(known)})"}
        )
    return name


def environment_add(*, tenant: Tenant, name: str, actor: str) -> Environment:
    if not NAME_PATTERN.fullmatch(name):
        raise ConnectionInvalid({"name": "lowercase letters, digits, - and _ (at most 64)"})
    try:
        with transaction.atomic():
            environment = Environment.objects.create(tenant=tenant, name=name)
            core_services.event_record(
                tenant=tenant, subject=f"environment:{name}", verb="environment_added", actor=actor
            )
    except IntegrityError:
        raise ConnectionInvalid({"name": f"environment {name!r} already exists"}) from None
    return environment


# Connections


def _config_check(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Connection settings PostgreSQL can store (no NUL, no NaN), as a plain dict."""
    config = dict(config or {})
    problems = unstorable_values(config)
    if problems:
        raise ConnectionInvalid({f"config.{path}": message for path, message in problems.items()})
    return config


def _credential_fields(secret: str | None, secret_ref: str | None) -> dict[str, str]:
    if secret and secret_ref:
        raise ConnectionInvalid({"secret": "give either secret or secret_ref, not both"})
    if secret_ref is not None and secret_ref and not ENV_REF_PATTERN.fullmatch(secret_ref):
        raise ConnectionInvalid(
            {"secret_ref": "must look like env:NAME (an environment variable of the workers)"}
        )
    if secret:
        if len(secret) > 4096 or "\x00" in secret:
            raise ConnectionInvalid({"secret": "at most 4096 characters, no NUL"})
        return {"secret_encrypted": encrypt_secret(secret), "secret_ref": ""}
    if secret_ref:
        return {"secret_ref": secret_ref, "secret_encrypted": ""}
    return {}


def connection_add(
    *,
    tenant: Tenant,
    environment: str,
    provider: str,
    name: str,
    actor: str,
    is_default: bool = False,
    secret: str | None = None,
    secret_ref: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Connection:
    """Add a connection; ``is_default`` makes it the environment's default for its provider
    (the previous default stops being one in the same transaction)."""
    fields: dict[str, str] = {}
    if not NAME_PATTERN.fullmatch(provider or ""):
        fields["provider"] = "lowercase letters, digits, - and _ (at most 64)"
    if not NAME_PATTERN.fullmatch(name or ""):
        fields["name"] = "lowercase letters, digits, - and _ (at most 64)"
    if fields:
        raise ConnectionInvalid(fields)
    environment_check(tenant, environment)
    credentials = _credential_fields(secret, secret_ref)
    config = _config_check(config)
    try:
        with transaction.atomic():
            if is_default:
                _clear_default(tenant.pk, environment, provider)
            connection = Connection.objects.create(
                tenant=tenant,
                environment=environment,
                provider=provider,
                name=name,
                is_default=is_default,
                config=config,
                created_by=actor,
                **credentials,
            )
            _audit(connection, "connection_added", actor)
    except IntegrityError:
        raise ConnectionInvalid(
            {
                "name": f"{provider} connection {name!r} already exists in {environment} (or a default "
                "was set at the same moment: try again)"
            }
        ) from None
    return connection


def connection_update(
    *,
    connection: Connection,
    actor: str,
    is_default: bool | None = None,
    secret: str | None = None,
    secret_ref: str | None = None,
    config: Mapping[str, Any] | None = None,
    archived: bool | None = None,
) -> Connection:
    """Change a connection: make it the default, rotate its secret, archive it. Runs already
    started keep the binding they have (a rotated secret is read at the next use)."""
    with transaction.atomic():
        if is_default:  # the provider's connections first, in id order (see _clear_default)
            _lock_siblings(connection.tenant_id, connection.environment, connection.provider)
        locked = Connection.objects.select_for_update().get(pk=connection.pk)
        changes: dict[str, Any] = _credential_fields(secret, secret_ref)
        if config is not None:
            changes["config"] = _config_check(config)
        if archived is not None:
            changes["archived_at"] = timezone.now() if archived else None
            if archived:
                changes["is_default"] = False
        if is_default:
            if archived or (locked.archived_at is not None and archived is None):
                raise ConnectionInvalid({"is_default": "an archived connection cannot be the default"})
            _clear_default(locked.tenant_id, locked.environment, locked.provider, keep=locked.pk)
            changes["is_default"] = True
        elif is_default is False:
            changes["is_default"] = False
        for name, value in changes.items():
            setattr(locked, name, value)
        locked.save()
        _audit(locked, "connection_changed", actor, changed=sorted(changes))
    return locked


def _clear_default(tenant_id: int, environment: str, provider: str, keep: int | None = None) -> None:
    """Take the default away from the provider's other connections in that environment. Their
    rows are locked first (in id order), so two admins changing one default at once take turns
    and the partial unique constraint never trips."""
    others = _lock_siblings(tenant_id, environment, provider).filter(is_default=True)
    if keep is not None:
        others = others.exclude(pk=keep)
    others.update(is_default=False, updated_at=timezone.now())


def _lock_siblings(tenant_id: int, environment: str, provider: str) -> QuerySet[Connection]:
    siblings = Connection.objects.filter(tenant_id=tenant_id, environment=environment, provider=provider)
    list(siblings.select_for_update().order_by("pk").values_list("pk", flat=True))
    return siblings


def _audit(connection: Connection, verb: str, actor: str, **extra: Any) -> None:
    core_services.event_record(
        tenant=connection.tenant_id,
        subject=f"connection:{connection.pk}",
        verb=verb,
        actor=actor,
        payload={
            "provider": connection.provider,
            "name": connection.name,
            "environment": connection.environment,
            "is_default": connection.is_default,
            **extra,
        },
    )


def connections_bind(
    *, tenant: Tenant | int, environment: str, providers: Iterable[str], requested: Mapping[str, object]
) -> dict[str, dict[str, Any]]:
    """The connections a starting run binds, as frozen in ``Run.connections``: for each
    provider, the one named in ``requested`` or the environment's default. Raises
    ConnectionInvalid (a 422, nothing stored) for a provider with neither, or a named connection
    that does not exist in the tenant's environment."""
    tenant_id = tenant if isinstance(tenant, int) else tenant.pk
    malformed = {
        f"connections.{provider}": "not a provider and connection name (lowercase letters, digits, - and _)"
        for provider, name in requested.items()
        if not (isinstance(name, str) and NAME_PATTERN.fullmatch(provider) and NAME_PATTERN.fullmatch(name))
    }
    if malformed:
        raise ConnectionInvalid(malformed)
    wanted = sorted({*providers, *requested})
    if not wanted:
        return {}
    live = Connection.objects.filter(
        tenant_id=tenant_id, environment=environment, provider__in=wanted, archived_at__isnull=True
    )
    by_provider: dict[str, list[Connection]] = {}
    for connection in live:
        by_provider.setdefault(connection.provider, []).append(connection)
    bound: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for provider in wanted:
        options = by_provider.get(provider, [])
        name = requested.get(provider)
        if name is not None:
            chosen = next((c for c in options if c.name == name), None)
            if chosen is None:
                errors[f"connections.{provider}"] = (
                    f"no {provider} connection named {name!r} in {environment}"
                )
                continue
        else:
            chosen = next((c for c in options if c.is_default), None)
            if chosen is None:
                errors[f"connections.{provider}"] = (
                    f"no default {provider} connection in {environment}: "
                    "add one, or name one in 'connections'"
                )
                continue
        bound[provider] = {"id": chosen.pk, "name": chosen.name}
    if errors:
        raise ConnectionInvalid(errors)
    return bound


@dataclass(frozen=True)
class BoundConnection:
    """What a step gets from ``ctx.connection(provider)``. The credential is resolved only when
    asked for (``secret()``) and is never part of the repr, logs or outputs."""

    id: int
    tenant_id: int
    environment: str
    provider: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""  # who is calling: recorded by a connector beside the call
    correlation_id: str = ""
    _secret_ref: str = field(default="", repr=False)
    _secret_encrypted: str = field(default="", repr=False)

    def secret(self) -> str:
        if self._secret_ref:
            value = os.environ.get(self._secret_ref.removeprefix("env:"))
            if value is None:
                raise ConnectionNotBound(
                    f"connection {self.name}: {self._secret_ref} is not set on this worker"
                )
            return value
        if self._secret_encrypted:
            return decrypt_secret(self._secret_encrypted)
        return ""

    @property
    def label(self) -> str:
        return f"{self.environment}/{self.provider}/{self.name}"


def connection_for_run(
    *, tenant_id: int, environment: str, binding: Mapping[str, Any], provider: str
) -> BoundConnection:
    """The connection a run bound for ``provider``: loaded by its id and the run's own tenant
    and environment, so a tampered or stale binding can never reach someone else's."""
    entry = binding.get(provider)
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
        bound = ", ".join(sorted(binding)) or "none"
        raise ConnectionNotBound(f"this run has no {provider} connection (bound: {bound})")
    connection = Connection.objects.filter(
        pk=entry["id"], tenant_id=tenant_id, environment=environment, provider=provider
    ).first()
    if connection is None:
        raise ConnectionNotBound(f"the {provider} connection {entry.get('name')!r} bound to this run is gone")
    return BoundConnection(
        id=connection.pk,
        tenant_id=connection.tenant_id,
        environment=connection.environment,
        provider=connection.provider,
        name=connection.name,
        config=dict(connection.config),
        _secret_ref=connection.secret_ref,
        _secret_encrypted=connection.secret_encrypted,
    )
