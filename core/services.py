"""Writes of the core app: API tokens, quotas, the event log."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from core.models import (
    BUILTIN_ENVIRONMENTS,
    ApiToken,
    Environment,
    Event,
    Membership,
    Tenant,
    TenantQuota,
    User,
)

TOKEN_PREFIX = "rw_"

# Listeners called after the transaction that wrote an event commits (live push, metrics).
# Other apps register here from their AppConfig.ready; core knows nothing of them.
EventListener = Callable[[Event], None]
_event_listeners: list[EventListener] = []


def event_listener_register(listener: EventListener) -> None:
    if listener not in _event_listeners:
        _event_listeners.append(listener)


def _notify_event_listeners(event: Event) -> None:
    for listener in list(_event_listeners):
        listener(event)


# Enrichers add context to an event's payload before it is written (runs stamps the run's
# contract on every event about a run). Registered from AppConfig.ready, like listeners.
EventEnricher = Callable[[str, dict[str, Any]], dict[str, Any]]
_event_enrichers: list[EventEnricher] = []


def event_enricher_register(enricher: EventEnricher) -> None:
    if enricher not in _event_enrichers:
        _event_enrichers.append(enricher)


def event_record(
    *, tenant: Tenant | int, subject: str, verb: str, actor: str, payload: dict[str, Any] | None = None
) -> Event:
    """Append an event in the caller's transaction; listeners run only once it commits."""
    tenant_id = tenant if isinstance(tenant, int) else tenant.pk
    payload = payload or {}
    for enrich in _event_enrichers:
        payload = enrich(subject, payload)
    event = Event.objects.create(
        tenant_id=tenant_id, subject=subject, verb=verb, actor=actor, payload=payload
    )
    transaction.on_commit(lambda: _notify_event_listeners(event))
    return event


def _hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_token_issue(*, user: User, name: str = "", environment: str = "production") -> str:
    """Create a token for ``user`` and return its secret; only its hash is stored. Runs started
    with it run in ``environment`` unless a request names another: one of the built-in
    environments or one added by a tenant of the user (else ValueError)."""
    known = {*BUILTIN_ENVIRONMENTS} | set(
        Environment.objects.filter(tenant__memberships__user=user).values_list("name", flat=True)
    )
    if environment not in known:
        raise ValueError(f"unknown environment {environment!r} (known: {', '.join(sorted(known))})")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    ApiToken.objects.create(
        user=user, name=name, environment=environment, prefix=raw[:10], token_hash=_hash_token(raw)
    )
    return raw


def api_token_authenticate(raw: str) -> User | None:
    """The active user a token belongs to, or None for an unknown, revoked or inactive one."""
    token = api_token_find(raw)
    return token.user if token is not None else None


def api_token_find(raw: str) -> ApiToken | None:
    """The live token ``raw`` is (with its active user), or None."""
    if not raw.startswith(TOKEN_PREFIX):
        return None
    token = (
        ApiToken.objects.select_related("user")
        .filter(token_hash=_hash_token(raw), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if token is None:
        return None
    now = timezone.now()
    # Touch last_used_at at most once a minute, so API traffic does not write on every call.
    ApiToken.objects.filter(pk=token.pk).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - timedelta(minutes=1))
    ).update(last_used_at=now)
    return token


@transaction.atomic
def tenant_quota_update(*, tenant: Tenant, actor: User, changes: dict[str, int]) -> TenantQuota:
    """Set some of a tenant's quota fields and record the change as an event."""
    allowed = {"max_concurrent_steps", "max_queue_depth", "weight"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"unknown quota fields: {', '.join(sorted(unknown))}")
    quota, _ = TenantQuota.objects.select_for_update().get_or_create(tenant=tenant)
    before = {field: getattr(quota, field) for field in changes}
    for field, value in changes.items():
        setattr(quota, field, value)
    quota.save(update_fields=[*changes, "updated_at"])
    event_record(
        tenant=tenant,
        subject=f"tenant:{tenant.slug}",
        verb="quota_updated",
        actor=actor.get_username(),
        payload={"before": before, "after": changes},
    )
    return quota


@transaction.atomic
def membership_revoke(*, tenant: Tenant, user: User, actor: User) -> bool:
    """Remove ``user``'s role in ``tenant``; their open live sockets for it are closed on commit.
    Returns False when there was no membership to remove."""
    from core import live

    deleted, _ = Membership.objects.filter(tenant=tenant, user=user).delete()
    if not deleted:
        return False
    event_record(
        tenant=tenant,
        subject=f"user:{user.get_username()}",
        verb="membership_revoked",
        actor=actor.get_username(),
    )
    transaction.on_commit(
        lambda: live.group_send(
            live.user_group(user.pk), {"type": "membership.revoked", "tenant_id": tenant.pk}
        )
    )
    return True
