"""Deadlocks between entity-lock waits: found, and broken with one victim per cycle.

A holder that waits for entity locks in the middle of its work (a step's ``ctx.lock``, a
governed call's ``locks``) records the wait (``LockWaiter``): who waits for which keys. The
live leases say who holds each key. A holder waiting for a key whose holder waits, in turn, for
a key of the first one is a cycle: neither can go on, and each would wait out its
``wait_timeout``. Every waiter looks for a cycle through itself at each of its attempts (a few
times a second), one at a time per tenant (an advisory lock), so exactly one victim is chosen per cycle:
by the cycle's policy, ``kill_youngest_waiter`` (the default: the one that waited least loses
least) or ``kill_oldest_waiter``. The victim's wait raises LockDeadlock (its step is retried or
failed by its retry policy, releasing what it holds); the cycle is an event on the run's
timeline and in the overview's tally, and shows on the ownership board while it lasts.

Admission never deadlocks: it grants a step's declared locks all at once, in one statement.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from core import coordination, rawsql, services
from core.leases import LeaseHeld
from core.models import Lease, LockWaiter, TenantQuota
from core.services import DEADLOCK_POLICIES

# The advisory lock (SEARCH_LOCK_ID, tenant id) a tenant's waiters' cycle searches take in turn.
SEARCH_LOCK_ID = 7_411_101
# A waiter refreshes its row at each search; one not refreshed for this long is gone.
WAITER_STALE_SECONDS = 5.0
# How often a waiter looks for a cycle through itself (its attempts may come more often).
SEARCH_EVERY_SECONDS = 0.2


class LockDeadlock(LeaseHeld):
    """This wait was one of a cycle of waits (each waiting for a lock another holds) and was
    chosen to give way: the locks it waits for will not come. ``cycle``: the waits, in order."""

    def __init__(self, cycle: list[dict[str, Any]]) -> None:
        path = " -> ".join(f"{w['holder']} (waits for {w['key']})" for w in cycle)
        super().__init__(f"deadlock: {path} -> back to the first; this wait gave way")
        self.cycle = cycle


@dataclass
class WaitWatch:
    """One holder's wait for entity locks: its LockWaiter row from the first attempt that had
    to wait, a cycle search now and then, the row gone when the wait ends."""

    tenant_id: int
    holder: str
    keys: list[str]
    metadata: dict[str, Any]
    policy: str = ""  # "": the tenant's (TenantQuota.deadlock_policy)
    waiter_id: int | None = None
    searched_at: float = field(default=0.0)

    def check(self) -> None:
        """After an attempt that found a key held: record the wait (the first time) and, every
        SEARCH_EVERY_SECONDS, look for a cycle through it. Raises LockDeadlock when this wait
        is the one to give way. Where this process does its database work."""
        if time.monotonic() - self.searched_at < SEARCH_EVERY_SECONDS:
            return
        self.searched_at = time.monotonic()
        if self.waiter_id is None:
            self.waiter_id = coordination.run(
                wait_begin,
                tenant_id=self.tenant_id,
                holder=self.holder,
                keys=self.keys,
                metadata=self.metadata,
                policy=self.policy,
            )
        coordination.run(deadlock_search, self.waiter_id, self.tenant_id)

    def end(self) -> None:
        if self.waiter_id is not None:
            coordination.run(wait_end, self.waiter_id)
            self.waiter_id = None


def wait_begin(*, tenant_id: int, holder: str, keys: list[str], metadata: dict[str, Any], policy: str) -> int:
    """Record that ``holder`` waits for ``keys`` (one row per holder: a new wait replaces it),
    with its workflow's deadlock policy, else its tenant's."""
    now = timezone.now()
    if not policy:
        quota_policy = TenantQuota.objects.filter(tenant_id=tenant_id).values_list(
            "deadlock_policy", flat=True
        )
        policy = quota_policy.first() or DEADLOCK_POLICIES[0]
    # The waits of processes that died waiting, long ignored (stale): gone now.
    LockWaiter.objects.filter(tenant_id=tenant_id, seen_at__lt=now - timedelta(hours=1)).delete()
    waiter, _ = LockWaiter.objects.update_or_create(
        tenant_id=tenant_id,
        holder=holder,
        defaults={
            "keys": keys,
            "metadata": metadata,
            "policy": policy,
            "since": now,
            "seen_at": now,
            "victim_of": None,
        },
    )
    return waiter.pk


def wait_end(waiter_id: int) -> None:
    LockWaiter.objects.filter(pk=waiter_id).delete()


def deadlock_search(waiter_id: int, tenant_id: int) -> None:
    """Look for a cycle of waits through this waiter; choose its victim if nobody has yet. One
    search at a time (an advisory lock), so two members of a cycle never choose two victims.
    Raises LockDeadlock when the victim is this waiter (its row gone, the choice committed)."""
    gave_way = _search(waiter_id, tenant_id, timezone.now())
    if gave_way is not None:
        raise LockDeadlock(gave_way)


def _search(waiter_id: int, tenant_id: int, now: Any) -> list[dict[str, Any]] | None:
    """The search, in a transaction of its own: the cycle when this waiter gives way."""
    with transaction.atomic():
        if rawsql.on_postgresql():  # one search at a time per tenant: cycles never cross tenants
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [SEARCH_LOCK_ID, tenant_id])
        # The first write: on SQLite, the writer's lock before the reads.
        LockWaiter.objects.filter(pk=waiter_id).update(seen_at=now)
        me = LockWaiter.objects.filter(pk=waiter_id).first()
        if me is None:
            return None
        if me.victim_of is not None:  # another member of its cycle chose it
            me.delete()
            return list(me.victim_of)
        waiters = {waiter.holder: waiter for waiter in _waiters(me.tenant_id, now)}
        cycle = _cycle_through(me, waiters, now)
        if not cycle:
            return None
        in_cycle = [waiters[step["holder"]] for step in cycle]
        if any(waiter.victim_of is not None for waiter in in_cycle):
            return None  # chosen already: it gives way at its next attempt
        victim = _victim(in_cycle)
        LockWaiter.objects.filter(pk=victim.pk).update(victim_of=cycle)
        services.event_record(
            tenant=me.tenant_id,
            subject=f"run:{victim.metadata.get('run_id', victim.holder)}",
            verb="deadlock_detected",
            actor="runwarden",
            payload={"cycle": cycle, "victim": victim.holder, "policy": _oldest(in_cycle).policy},
        )
        if victim.pk != me.pk:
            return None
        me.delete()
        return cycle


def _waiters(tenant_id: int, now: Any) -> list[LockWaiter]:
    fresh = now - timedelta(seconds=WAITER_STALE_SECONDS)
    return list(LockWaiter.objects.filter(tenant_id=tenant_id, seen_at__gte=fresh).order_by("since", "id"))


def _cycle_through(me: LockWaiter, waiters: dict[str, LockWaiter], now: Any) -> list[dict[str, Any]]:
    """The shortest cycle of waits from ``me`` back to it, as [{holder, key, held_by}, ...]."""
    wanted = sorted({key for waiter in waiters.values() for key in waiter.keys})
    held_by = dict(
        Lease.objects.filter(
            tenant_id=me.tenant_id, key__in=wanted, released_at__isnull=True, expires_at__gt=now
        ).values_list("key", "holder")
    )
    # Breadth first from me: each waiter's edges go to the holders of the keys it waits for.
    paths: dict[str, list[dict[str, Any]]] = {me.holder: []}
    frontier = [me.holder]
    while frontier:
        following = []
        for holder in frontier:
            for key in waiters[holder].keys:
                owner = held_by.get(key)
                if owner is None or owner == holder:
                    continue
                path = [*paths[holder], {"holder": holder, "key": key, "held_by": owner}]
                if owner == me.holder:
                    return path
                if owner in waiters and owner not in paths:
                    paths[owner] = path
                    following.append(owner)
        frontier = following
    return []


def _oldest(cycle: list[LockWaiter]) -> LockWaiter:
    return min(cycle, key=lambda waiter: (waiter.since, waiter.pk))


def _victim(cycle: list[LockWaiter]) -> LockWaiter:
    """The waiter the cycle's policy gives way (the policy of its oldest waiter decides)."""
    if _oldest(cycle).policy == "kill_oldest_waiter":
        return _oldest(cycle)
    return max(cycle, key=lambda waiter: (waiter.since, waiter.pk))


def waits_for_board(tenant_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The waits in progress (fresh), each with who holds what it waits for and, when it was
    chosen to break a cycle, the cycle: the ownership board's waiters."""
    now = timezone.now()
    fresh = now - timedelta(seconds=WAITER_STALE_SECONDS)
    waiters = list(
        LockWaiter.objects.filter(tenant_id__in=tenant_ids, seen_at__gte=fresh)
        .select_related("tenant")
        .order_by("since", "id")
    )
    keys = {(w.tenant_id, key) for w in waiters for key in w.keys}
    held = {
        (tenant_id, key): holder
        for tenant_id, key, holder in Lease.objects.filter(
            tenant_id__in={t for t, _ in keys},
            key__in={k for _, k in keys},
            released_at__isnull=True,
            expires_at__gt=now,
        ).values_list("tenant_id", "key", "holder")
    }
    return [
        {
            "tenant": waiter.tenant.slug,
            "holder": waiter.holder,
            "run_id": waiter.metadata.get("run_id", ""),
            "keys": [{"key": key, "held_by": held.get((waiter.tenant_id, key), "")} for key in waiter.keys],
            "since": waiter.since,
            "waited_seconds": round((now - waiter.since).total_seconds(), 1),
            "cycle": waiter.victim_of,
        }
        for waiter in waiters
    ]
