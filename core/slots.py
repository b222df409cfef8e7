"""Concurrency slots: at no instant do admitted holders exceed the cap of any scope.

A scope with cap N has seats 0..N-1 (rows, created on first need). Admission claims one free
seat in every scope, or none, in one transaction. A seat is free when it has no lease or its
expiry has passed: seats carry the expiry of the lease that holds them and are renewed and
released with it (see core.leases), so a holder that crashes frees its seats when its lease
runs out, and no seat can leak.

Seats are picked with ``FOR UPDATE SKIP LOCKED`` and the claim re-checks only the seat's own
columns, so two racing admissions can never take the same seat.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from core.leases import LeaseGrant
from core.models import ConcurrencySlot, TenantQuota


@dataclass(frozen=True)
class Scope:
    name: str  # e.g. "global", "tenant:3", "workflow:demo.crm_update", "lane:external", "tool:crm"
    cap: int


class NoRoom(Exception):
    def __init__(self, scope: str) -> None:
        super().__init__(f"scope {scope!r} is at its cap")
        self.scope = scope


def _claim_seat(*, scope: Scope, grant: LeaseGrant, now: datetime) -> bool:
    adapt = connection.ops.adapt_datetimefield_value
    skip_locked = "FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""
    sql = f"""
        UPDATE core_concurrencyslot
        SET lease_id = %s, lease_token = %s, claimed_at = %s, expires_at = %s
        WHERE id = (
            SELECT id FROM core_concurrencyslot
            WHERE scope = %s AND slot_no < %s AND (lease_id IS NULL OR expires_at IS NULL OR expires_at <= %s)
            AND NOT EXISTS (
                SELECT 1 FROM core_concurrencyslot above
                WHERE above.scope = %s AND above.slot_no >= %s AND above.lease_id IS NOT NULL
                AND above.expires_at > %s
            )
            ORDER BY slot_no
            LIMIT 1
            {skip_locked}
        )
        RETURNING id
    """
    # A lowered cap admits nobody until the seats above it have drained.
    params = [
        grant.id, grant.token, adapt(now), adapt(grant.expires_at),
        scope.name, scope.cap, adapt(now),
        scope.name, scope.cap, adapt(now),
    ]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone() is not None


def _ensure_seats(scope: Scope) -> None:
    """Create the missing seats 0..cap-1 of a scope (idempotent under concurrency)."""
    existing = set(
        ConcurrencySlot.objects.filter(scope=scope.name, slot_no__lt=scope.cap).values_list(
            "slot_no", flat=True
        )
    )
    missing = [ConcurrencySlot(scope=scope.name, slot_no=n) for n in range(scope.cap) if n not in existing]
    if missing:
        ConcurrencySlot.objects.bulk_create(missing, ignore_conflicts=True)


def slots_claim(*, grant: LeaseGrant, scopes: Sequence[Scope], now: datetime | None = None) -> None:
    """Claim a seat in every scope for ``grant``'s lease, or none (raises NoRoom).

    Scopes are taken in sorted order. Runs in a savepoint, so on NoRoom nothing is claimed,
    and the caller's transaction (if any) goes on.
    """
    now = now or timezone.now()
    with transaction.atomic():
        for scope in sorted(scopes, key=lambda s: s.name):
            if _claim_seat(scope=scope, grant=grant, now=now):
                continue
            _ensure_seats(scope)
            if not _claim_seat(scope=scope, grant=grant, now=now):
                raise NoRoom(scope.name)


def live_seat_counts(scopes: Iterable[str] | None = None, now: datetime | None = None) -> dict[str, int]:
    """How many seats of each scope are held right now."""
    now = now or timezone.now()
    query = ConcurrencySlot.objects.filter(lease__isnull=False, expires_at__gt=now)
    if scopes is not None:
        query = query.filter(scope__in=list(scopes))
    rows = query.values("scope").annotate(n=Count("id")).order_by("scope")
    return {row["scope"]: row["n"] for row in rows}


def admission_scopes(*, tenant_id: int, workflow: str, lane: str, tool: str = "") -> list[Scope]:
    """The scopes a step must have room in, with caps from settings and the tenant's quota.

    Entity scopes (cap 1) are the entity locks themselves (core.leases.locks_acquire).
    """
    caps = settings.RUNWARDEN_CAPS
    quota = (
        TenantQuota.objects.filter(tenant_id=tenant_id).values_list("max_concurrent_steps", flat=True).first()
    )
    scopes = [
        Scope("global", caps["global"]),
        Scope(f"tenant:{tenant_id}", quota or caps["tenant_default"]),
    ]
    if workflow in caps["workflow"]:
        scopes.append(Scope(f"workflow:{workflow}", caps["workflow"][workflow]))
    if lane in caps["lane"]:
        scopes.append(Scope(f"lane:{lane}", caps["lane"][lane]))
    if tool and tool in caps["tool"]:
        scopes.append(Scope(f"tool:{tool}", caps["tool"][tool]))
    return scopes
