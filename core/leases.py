"""Leases with fencing tokens, and entity locks built on them.

A lease is ownership of a key for a while. ``lease_acquire`` is one conditional upsert: it
inserts the key's row, or takes the row over only when the current lease is expired or
released. The fencing token is drawn *in the UPDATE clause*, after the row lock is held, so a
take-over always gets a larger token than the lease it replaces.

Times come from the application host's clock (hosts are expected to run NTP); a skew of a
few hundred milliseconds only shortens or lengthens a lease by as much, and fencing tokens
keep a late writer out whatever the clocks say.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from core import coordination, rawsql, services
from core.models import Lease


class LeaseError(Exception):
    pass


class LeaseHeld(LeaseError):
    """The key is held by someone else (a live lease)."""


class LockTimeout(LeaseHeld):
    """Waited for entity locks for as long as allowed and did not get them all."""


class StaleToken(LeaseError):
    """The token no longer owns the key: the lease expired, was released or taken over."""

    def __init__(self, key: str, token: int) -> None:
        super().__init__(f"fencing token {token} no longer owns {key!r}; the write was refused")
        self.key = key
        self.token = token


@dataclass(frozen=True)
class LeaseGrant:
    id: int
    tenant_id: int
    key: str
    token: int
    acquired_at: datetime
    expires_at: datetime


def _now(now: datetime | None) -> datetime:
    return now or timezone.now()


def _adapt(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def lease_acquire(
    *,
    tenant_id: int,
    key: str,
    holder: str,
    ttl: float,
    metadata: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> LeaseGrant | None:
    """Grant ``key`` to ``holder`` for ``ttl`` seconds, or return None while someone else holds it.

    One statement; safe to call from any number of processes at once.
    """
    request = LeaseRequest(tenant_id, key, holder, ttl, metadata or {})
    return leases_acquire_many([request], now=now).get((tenant_id, key))


@dataclass(frozen=True)
class LeaseRequest:
    tenant_id: int
    key: str
    holder: str
    ttl: float
    metadata: dict[str, Any]


def leases_acquire_many(
    requests: Sequence[LeaseRequest], *, now: datetime | None = None
) -> dict[tuple[int, str], LeaseGrant]:
    """Grant every requested key that is free, in ONE statement; returns the grants by
    (tenant_id, key). A key held by a live lease is simply missing from the result.

    The batched form of ``lease_acquire`` (the dispatcher grants a whole round's step leases
    and entity locks with it). Each (tenant, key) may appear once per call. On PostgreSQL a
    take-over draws its token in the UPDATE clause, after the row lock, as ``lease_acquire``
    does, so tokens still rise across take-overs.
    """
    if not requests:
        return {}
    if len({(r.tenant_id, r.key) for r in requests}) != len(requests):
        raise ValueError("leases_acquire_many: a key may be requested once per call")
    now = _now(now)
    with transaction.atomic(savepoint=False):  # one statement on PostgreSQL; a savepoint buys nothing
        return _acquire_many(requests, now)


def _acquire_many(requests: Sequence[LeaseRequest], now: datetime) -> dict[tuple[int, str], LeaseGrant]:
    params: list[Any] = []
    rows = []
    if rawsql.on_postgresql():
        token_sql, update_token_sql = "nextval('core_fencing_token_seq')", "nextval('core_fencing_token_seq')"
        first_token = 0
    else:
        # SQLite serialises writers: reserve a block of the counter for this statement.
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE core_fencingcounter SET value = value + %s WHERE id = 1 RETURNING value",
                [len(requests)],
            )
            first_token = cursor.fetchone()[0] - len(requests) + 1
        token_sql, update_token_sql = "%s", "EXCLUDED.token"
    for n, request in enumerate(requests):
        rows.append(f"(%s, %s, {token_sql}, %s, %s, %s, %s, %s, NULL)")
        params += [request.tenant_id, request.key]
        if not rawsql.on_postgresql():
            params.append(first_token + n)
        params += [
            request.holder,
            json.dumps(request.metadata),
            _adapt(now),
            _adapt(now),
            _adapt(now + timedelta(seconds=request.ttl)),
        ]
    sql = f"""
        INSERT INTO core_lease {LEASE_GRANT_COLUMNS}
        VALUES {", ".join(rows)}
        {lease_take_over_sql("core_lease", token_sql=update_token_sql, now="%s")}
        RETURNING id, tenant_id, key, token, expires_at
    """
    params.append(_adapt(now))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        granted = cursor.fetchall()
    by_key = {(r.tenant_id, r.key): r for r in requests}
    grants = {}
    for lease_id, tenant_id, key, token, _ in granted:
        request = by_key[(tenant_id, key)]
        grants[(tenant_id, key)] = LeaseGrant(
            id=lease_id,
            tenant_id=tenant_id,
            key=key,
            token=token,
            acquired_at=now,
            expires_at=now + timedelta(seconds=request.ttl),
        )
    return grants


def lease_renew(*, grant: LeaseGrant, ttl: float, now: datetime | None = None) -> LeaseGrant:
    """Extend a live lease by ``ttl`` seconds from now.

    Raises StaleToken when the lease expired, was released or was taken over: a holder that
    lost its lease cannot get it back by renewing.
    """
    now = _now(now)
    expires_at = now + timedelta(seconds=ttl)
    renewed = Lease.objects.filter(live_leases_filter(now), pk=grant.id, token=grant.token).update(
        renewed_at=now, expires_at=expires_at
    )
    if renewed != 1:
        raise StaleToken(grant.key, grant.token)
    return LeaseGrant(grant.id, grant.tenant_id, grant.key, grant.token, grant.acquired_at, expires_at)


def leases_renew(
    *, grants: Sequence[LeaseGrant], ttl: float, now: datetime | None = None
) -> list[LeaseGrant]:
    """Renew several leases (a step's lease and its entity locks), all or none.

    One statement, no reads: a heartbeat. Raises StaleToken naming the first lost lease.
    """
    if not grants:
        return []
    now = _now(now)
    expires_at = now + timedelta(seconds=ttl)
    owned = Q()
    for grant in grants:
        owned |= Q(pk=grant.id, token=grant.token)
    with transaction.atomic(savepoint=False):
        renewed = Lease.objects.filter(owned, live_leases_filter(now)).update(
            renewed_at=now, expires_at=expires_at
        )
        if renewed != len(grants):
            alive = set(Lease.objects.filter(owned, live_leases_filter(now)).values_list("pk", flat=True))
            lost = next(grant for grant in grants if grant.id not in alive)
            raise StaleToken(lost.key, lost.token)
    return [LeaseGrant(g.id, g.tenant_id, g.key, g.token, g.acquired_at, expires_at) for g in grants]


def leases_renew_many(
    holders: Sequence[tuple[Sequence[LeaseGrant], float]], *, now: datetime | None = None
) -> list[list[LeaseGrant] | None]:
    """Renew the leases of many holders at once (a worker's running steps: each its grants and
    its lease length) in ONE statement (and a read, only when one was passed over or lost); per
    holder, its grants, or None when one of its leases was lost (that holder alone: the others
    are renewed).

    A renewal never waits for a row lock: a lease locked at that moment (its step's fenced
    write in progress, a cancel, a take-over) is passed over, and its grant comes back as it was (its
    old ``expires_at``: the holder renews it again before then). Waiting would order this
    statement's locks against a fence's (its own lease, then its others by id) and deadlock.
    """
    grants = [grant for owned, _ in holders for grant in owned]
    if not grants:
        return [[] for _ in holders]
    now = _now(now)
    expiry = {grant.id: now + timedelta(seconds=ttl) for owned, ttl in holders for grant in owned}
    owned, owned_params = owned_sql(grants)
    cases = " ".join(["WHEN %s THEN %s"] * len(expiry))
    case_params = [v for lease_id, expires in expiry.items() for v in (lease_id, _adapt(expires))]
    if rawsql.on_postgresql():
        sql = (
            f"WITH free AS (SELECT id FROM core_lease WHERE {owned} AND {live_lease_sql()}"
            " FOR NO KEY UPDATE SKIP LOCKED)"
            f" UPDATE core_lease SET renewed_at = %s, expires_at = CASE core_lease.id {cases} END"
            " FROM free WHERE core_lease.id = free.id RETURNING core_lease.id"
        )
        params = [*owned_params, _adapt(now), _adapt(now), *case_params]
    else:  # SQLite has no row locks to wait for
        sql = (
            f"UPDATE core_lease SET renewed_at = %s, expires_at = CASE id {cases} END"
            f" WHERE {owned} AND {live_lease_sql()} RETURNING id"
        )
        params = [_adapt(now), *case_params, *owned_params, _adapt(now)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        renewed = {row[0] for row in cursor.fetchall()}
    held = renewed | _still_held([g for g in grants if g.id not in renewed], now)
    return [
        [replace(g, expires_at=expiry[g.id]) if g.id in renewed else g for g in owned]
        if all(g.id in held for g in owned)
        else None
        for owned, _ in holders
    ]


def _still_held(grants: Sequence[LeaseGrant], now: datetime) -> set[int]:
    """Which of these leases their tokens still hold, read without waiting for row locks (a
    lease passed over by a renewal because a write had it locked)."""
    if not grants:
        return set()
    owned, params = owned_sql(grants)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM core_lease WHERE {owned} AND {live_lease_sql()}", [*params, _adapt(now)]
        )
        return {row[0] for row in cursor.fetchall()}


def lease_release(*, grant: LeaseGrant, now: datetime | None = None) -> bool:
    """Release a lease. False when the token no longer held it."""
    return leases_release([grant], now=now) == 1


def leases_release(grants: Sequence[LeaseGrant], now: datetime | None = None) -> int:
    """Release several leases in one statement; only those the given tokens still hold."""
    if not grants:
        return 0
    owned, params = owned_sql(grants)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE core_lease SET released_at = %s WHERE {owned} AND released_at IS NULL",
            [_adapt(_now(now)), *params],
        )
        return int(cursor.rowcount)


def owned_sql(grants: Sequence[LeaseGrant]) -> tuple[str, list[Any]]:
    """A WHERE fragment for "these leases, while these tokens hold them", and its parameters."""
    # Typed, so that the statement can also be prepared (its parameters' types unknown then).
    pairs = ", ".join(["(CAST(%s AS bigint), CAST(%s AS bigint))"] * len(grants))
    return f"(id, token) IN (VALUES {pairs})", [v for grant in grants for v in (grant.id, grant.token)]


def lease_revoke(*, tenant_id: int, keys: Iterable[str], now: datetime | None = None) -> int:
    """Expire the live leases on ``keys`` at once; their holders are fenced out from now on."""
    now = _now(now)
    with transaction.atomic():
        live = Lease.objects.filter(live_leases_filter(now), tenant_id=tenant_id, key__in=list(keys))
        ids = list(live.order_by("pk").select_for_update(no_key=True).values_list("pk", flat=True))
        # released_at too: a renewal judged by a clock a moment behind can never revive it.
        return Lease.objects.filter(pk__in=ids).update(expires_at=now, released_at=now)


def lease_fence(
    *,
    tenant_id: int,
    key: str,
    token: int,
    now: datetime | None = None,
    prelude_sql: tuple[str, Sequence[Any]] = ("", ()),
) -> None:
    """Check, inside the caller's transaction, that ``token`` still owns ``key``.

    Must be called inside ``transaction.atomic()``: the lease row stays locked until the
    caller's write commits, so no take-over can slip between this check and that write.
    Raises StaleToken otherwise. ``prelude_sql``: statements (SQL ending in ``;``, parameters) to
    run first, in the same round trip (row locks a caller must take before this one).
    """
    if not connection.in_atomic_block:
        raise RuntimeError("lease_fence must run inside the transaction of the write it protects")
    first, first_params = prelude_sql
    fence, params = fence_sql(tenant_id=tenant_id, key=key, token=token, now=_now(now))
    with connection.cursor() as cursor:
        cursor.execute(f"{first}{fence}", [*first_params, *params])
        if cursor.fetchone() is None:
            raise StaleToken(key, token)


def fence_sql(*, tenant_id: int, key: str, token: int, now: datetime) -> tuple[str, list[Any]]:
    """The fence as a query (no ``;``), and its parameters: the lease's row while ``token`` owns
    ``key`` at ``now``, locked until the transaction ends; no row when it does not."""
    return (
        "SELECT id FROM core_lease WHERE tenant_id = %s AND key = %s AND token = %s"
        f" AND {live_lease_sql()}{_no_key_update()}",
        [tenant_id, key, token, _adapt(now)],
    )


def _no_key_update() -> str:
    """Row locks: PostgreSQL's. SQLite has none (it serialises writers instead)."""
    return " FOR NO KEY UPDATE" if rawsql.on_postgresql() else ""


def _fence_all(grants: Sequence[LeaseGrant]) -> None:
    """Every grant still holds its lease (rows locked until the caller commits), or StaleToken."""
    owned, params = owned_sql(grants)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM core_lease WHERE {owned} AND {live_lease_sql()} ORDER BY id{_no_key_update()}",
            [*params, _adapt(timezone.now())],
        )
        held = {row[0] for row in cursor.fetchall()}
    lost = next((grant for grant in grants if grant.id not in held), None)
    if lost is not None:
        raise StaleToken(lost.key, lost.token)


class Fence:
    """The lease check of a ``fenced_write``. Checked as the transaction begins, or, deferred,
    by the transaction's first write, in that write's own round trip: the write sends
    ``in_write``'s statements first and its fence queries as CTEs every change depends on, and
    hands what they found to ``confirm``. A write that cannot carry it calls ``check``."""

    def __init__(
        self,
        *,
        tenant_id: int,
        key: str,
        token: int,
        prelude_sql: tuple[str, Sequence[Any]],
        also: Sequence[LeaseGrant] = (),
    ) -> None:
        self.tenant_id, self.key, self.token = tenant_id, key, token
        self.prelude_sql = prelude_sql
        self.also = list(also)
        self.checked = False

    @property
    def deferred(self) -> bool:
        """Not checked yet: the next write must carry it (``in_write``) or ``check`` it first."""
        return not self.checked

    def check(self) -> None:
        """Check it now, in a round trip of its own (and one for ``also``), if no write has
        carried it yet."""
        if not self.checked:
            self._held_or_stale(self.prelude_sql)
            self.checked = True

    def in_write(self) -> FenceInWrite:
        """What a write carrying the fence sends (``FenceInWrite``)."""
        first, first_params = self.prelude_sql
        now = timezone.now()
        fence, params = fence_sql(tenant_id=self.tenant_id, key=self.key, token=self.token, now=now)
        ctes, held = f"fence AS MATERIALIZED ({fence})", "EXISTS (SELECT 1 FROM fence)"
        if self.also:
            # The entity locks' rows after the lease's, by id, as ``_fence_all`` takes them:
            # fence_also reads fence (an init plan, run before any of its rows is locked).
            owned, owned_params = owned_sql(self.also)
            ctes += (
                f", fence_also AS MATERIALIZED (SELECT id FROM core_lease WHERE {owned}"
                f" AND {live_lease_sql()} AND EXISTS (SELECT 1 FROM fence) ORDER BY id{_no_key_update()})"
            )
            params += [*owned_params, _adapt(now)]
            held = f"({held} AND (SELECT count(*) FROM fence_also) = {len(self.also)})"
        return FenceInWrite((first, list(first_params)), ctes, params, held)

    def confirm(self, held: bool) -> None:
        """What the carried fence found: StaleToken (the transaction is rolled back) if the
        token no longer owned the lease, or a lock of ``also`` was lost — named by checking
        them again, in this transaction that holds their rows."""
        if not held:
            self._held_or_stale(("", ()))  # its prelude's locks are held already
            raise StaleToken(self.key, self.token)
        self.checked = True

    def _held_or_stale(self, prelude_sql: tuple[str, Sequence[Any]]) -> None:
        """The lease, then ``also``, checked (rows locked), or StaleToken naming the one lost."""
        lease_fence(tenant_id=self.tenant_id, key=self.key, token=self.token, prelude_sql=prelude_sql)
        if self.also:
            _fence_all(self.also)


@dataclass(frozen=True)
class FenceInWrite:
    """What a write carrying a ``Fence`` sends: ``prelude`` (statements ending in ``;``, row
    locks taken before the lease's, and their parameters) first; ``ctes`` (the fence's
    ``MATERIALIZED`` CTEs, named ``fence`` and, with entity locks, ``fence_also``) and their
    ``params`` at the head of its ``WITH``; ``held``, a boolean expression every change must
    depend on and whose value goes to ``Fence.confirm``."""

    prelude: tuple[str, list[Any]]
    ctes: str
    params: list[Any]
    held: str


@contextmanager
def fenced_write(
    *,
    tenant_id: int,
    key: str,
    token: int,
    actor: str,
    prelude_sql: tuple[str, Sequence[Any]] = ("", ()),
    also: Sequence[LeaseGrant] = (),
    deferred: bool = False,
) -> Iterator[Fence]:
    """A transaction whose writes commit only while ``token`` owns ``key``.

    ``prelude_sql`` (statements ending in ``;``, and their parameters) runs first, in the
    fence's round trip (its own, or the write's that carries it), before the fence's row lock
    (e.g. locks that must always be taken before it, so two lock orders never meet). ``also``:
    more leases (a step's entity locks) that must still be held for the write to commit.

    ``deferred`` (PostgreSQL): the fence (``also`` with it) is not checked as the transaction
    begins; its first write carries it (``Fence``), a round trip or two fewer. Nothing commits
    unchecked.

    A refused write raises StaleToken after recording a ``stale_token_write`` event in a
    transaction of its own (the refused one is rolled back). Not nestable in an outer
    transaction, because the refusal must be recorded even though the write is not.
    """
    fence = Fence(tenant_id=tenant_id, key=key, token=token, prelude_sql=prelude_sql, also=also)
    try:
        with transaction.atomic(durable=True):
            if not (deferred and rawsql.on_postgresql()):
                fence.check()
            yield fence
            if not fence.checked:
                raise RuntimeError("a deferred fence was never checked: its transaction is not committed")
    except StaleToken as exc:
        with transaction.atomic():
            services.event_record(
                tenant=tenant_id,
                subject=key,
                verb="stale_token_write",
                actor=actor,
                payload={"key": exc.key, "token": exc.token},
            )
        raise


class LockPolicy:
    """What to do when an entity lock is held (the vocabulary of Hatchet and Inngest)."""

    WAIT = "wait"  # wait (bounded) until every lock is free
    SKIP = "skip"  # give up at once; the caller skips this step
    CANCEL_NEWEST = "cancel_newest"  # give up at once; the caller cancels the newcomer
    CANCEL_IN_PROGRESS = "cancel_in_progress"  # revoke the holders' leases and take over
    ALL = (WAIT, SKIP, CANCEL_NEWEST, CANCEL_IN_PROGRESS)


def _try_acquire_all(
    *, tenant_id: int, keys: list[str], holder: str, ttl: float, metadata: dict[str, Any] | None
) -> list[LeaseGrant] | None:
    """All of ``keys`` or none, in one transaction, taken in sorted order."""
    grants: list[LeaseGrant] = []
    try:
        with transaction.atomic():
            for key in keys:
                grant = lease_acquire(tenant_id=tenant_id, key=key, holder=holder, ttl=ttl, metadata=metadata)
                if grant is None:
                    raise LeaseHeld(key)
                grants.append(grant)
    except LeaseHeld:
        return None
    return grants


def locks_acquire(
    *,
    tenant_id: int,
    keys: Iterable[str],
    holder: str,
    ttl: float,
    policy: str = LockPolicy.WAIT,
    wait_timeout: float = 30.0,
    metadata: dict[str, Any] | None = None,
    watch: Any = None,
) -> list[LeaseGrant]:
    """Take every entity lock in ``keys``, all or nothing.

    Keys are taken in one canonical (sorted) order inside one transaction, so two callers
    wanting {A, B} and {B, A} cannot deadlock: no transaction ever waits while holding a lock
    another one needs. Raises LeaseHeld (``skip``, ``cancel_newest``) or LockTimeout (``wait``)
    when the locks cannot be had. Each attempt runs where this process does its database work
    (core.coordination); a ``wait`` waits between attempts here, holding no connection.
    ``watch`` (core.deadlocks.WaitWatch): told after each attempt that had to wait, it records
    the wait and raises LockDeadlock when the wait is one of a cycle and was chosen to give way.
    """
    wait = LockWait(keys, wait_timeout)
    while True:
        grants = coordination.run(
            locks_try_acquire,
            tenant_id=tenant_id,
            keys=keys,
            holder=holder,
            ttl=ttl,
            policy=policy,
            metadata=metadata,
        )
        if grants is not None:
            return grants
        delay = wait.next_delay()
        if watch is not None:
            watch.check()
        time.sleep(delay)


class LockWait:
    """How long a ``wait`` lock waits before its next attempt: full jitter, doubling up to a
    quarter second, so waiters do not retry in lockstep; LockTimeout past ``wait_timeout``."""

    def __init__(self, keys: Iterable[str], wait_timeout: float) -> None:
        self.keys = ", ".join(sorted(set(keys)))
        self.deadline = time.monotonic() + wait_timeout
        self.delay = 0.005

    def next_delay(self) -> float:
        if time.monotonic() >= self.deadline:
            raise LockTimeout(self.keys)
        delay, self.delay = random.uniform(0, self.delay), min(self.delay * 2, 0.25)
        return delay


def locks_try_acquire(
    *,
    tenant_id: int,
    keys: Iterable[str],
    holder: str,
    ttl: float,
    policy: str = LockPolicy.WAIT,
    metadata: dict[str, Any] | None = None,
) -> list[LeaseGrant] | None:
    """One attempt of ``locks_acquire``: the grants, or None when a ``wait`` lock must wait
    (LeaseHeld for the other policies)."""
    if policy not in LockPolicy.ALL:
        raise ValueError(f"unknown lock policy {policy!r}; use one of {', '.join(LockPolicy.ALL)}")
    ordered = sorted(set(keys))
    if not ordered:
        return []
    if policy == LockPolicy.CANCEL_IN_PROGRESS:
        with transaction.atomic():
            preempted = lease_revoke(tenant_id=tenant_id, keys=ordered)
            grants = _try_acquire_all(
                tenant_id=tenant_id, keys=ordered, holder=holder, ttl=ttl, metadata=metadata
            )
            if grants is None:  # a concurrent caller preempted them first
                raise LeaseHeld(", ".join(ordered))
            if preempted:
                services.event_record(
                    tenant=tenant_id,
                    subject=",".join(ordered),
                    verb="locks_preempted",
                    actor=holder,
                    payload={"keys": ordered, "revoked": preempted},
                )
            return grants
    grants = _try_acquire_all(tenant_id=tenant_id, keys=ordered, holder=holder, ttl=ttl, metadata=metadata)
    if grants is None and policy != LockPolicy.WAIT:
        raise LeaseHeld(", ".join(ordered))
    return grants


def locks_release(grants: Iterable[LeaseGrant]) -> None:
    leases_release(list(grants))


def live_leases_filter(now: datetime | None = None) -> Q:
    """The one rule of a live lease, for the ORM: not released, not past its expiry."""
    return Q(released_at__isnull=True, expires_at__gt=_now(now))


# The columns every grant writes (a new lease row, or a free one taken over), in this order.
LEASE_GRANT_COLUMNS = (
    "(tenant_id, key, token, holder, metadata, acquired_at, renewed_at, expires_at, released_at)"
)


def lease_take_over_sql(alias: str, *, token_sql: str, now: str) -> str:
    """The ``ON CONFLICT`` clause of every grant (an ``INSERT INTO core_lease AS alias``): a
    key's row is taken over, with a new token, only when its lease is no longer live; a live
    lease leaves the row untouched and the key ungranted."""
    return f"""ON CONFLICT (tenant_id, key) DO UPDATE SET
            token = {token_sql}, holder = EXCLUDED.holder, metadata = EXCLUDED.metadata,
            acquired_at = EXCLUDED.acquired_at, renewed_at = EXCLUDED.renewed_at,
            expires_at = EXCLUDED.expires_at, released_at = NULL
        WHERE NOT ({live_lease_sql(alias, now)})"""


def live_lease_sql(alias: str = "", now: str = "%s") -> str:
    """The same rule for hand-written SQL: ``alias`` the lease table's alias, ``now`` the
    placeholder of the instant it is judged at."""
    column = f"{alias}." if alias else ""
    return f"{column}released_at IS NULL AND {column}expires_at > {now}"
