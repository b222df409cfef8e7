"""A tenant's queue depth (its unfinished runs), and the place a new run takes in it.

A start must not pass the tenant's ``max_queue_depth``, and starts of one tenant must not queue
on one row. On PostgreSQL the unfinished runs are counted on ``SHARDS`` rows per tenant
(``QueueDepth``), kept by a trigger on runs_run, so the check reads 16 small rows whatever the
backlog. A start holds one of those rows until it commits (its place):

- **fast path**: lock any free row (``SKIP LOCKED``), then read the sum. Every start in flight
  holds a distinct row, so at most ``SHARDS`` are in flight unseen by each other: when the sum
  leaves room for all of them (``sum <= limit - SHARDS``), this one fits whatever they do;
- **slow path** (near the limit, or every row busy): the fast attempt's savepoint is rolled back
  (its row released), then every row is locked in shard order — no start is in flight unseen —
  and the exact sum decides. Slow starts lock in one order and fast ones never wait, so starts
  cannot deadlock on these rows; a run finishing waits only for a start's commit;
- **a changed max_queue_depth** locks every row too (``queue_places_hold_all``): the starts in
  flight commit before it, every later one reads the new limit.

The fast path is a function in the database (``runs_queue_place_fast``), so a start outside any
transaction can take its place and write its run in one round trip (runs.services), the function
refusing on the server where the slow path must decide.

On SQLite (the embedded default, one writer at a time) the unfinished runs are counted.
"""

from __future__ import annotations

import random
from typing import Any

from django.db import connection

from core import rawsql
from core.models import Tenant, TenantQuota
from runs.models import Run
from runs.transitions import UNFINISHED_RUN_STATUSES

SHARDS = 16


class QuotaExceeded(Exception):
    def __init__(self, tenant: Tenant, depth: int, limit: int) -> None:
        super().__init__(
            f"tenant {tenant.slug} has {depth} unfinished runs; its queue-depth quota is {limit}"
        )
        self.depth = depth
        self.limit = limit
        self.retry_after = 5


def _default_limit() -> int:
    return int(TenantQuota._meta.get_field("max_queue_depth").get_default())


# The fast path is the database function runs_queue_place_fast
# (runs/migrations/0015_queue_place_function.py): it locks a free row, reads the sum in a
# statement of its own (after the lock), and returns the row when the sum leaves room for every
# start in flight, else NULL (or, refusing, raises SQLSTATE RWQ01). The row is noted in
# runwarden.depth_shard for the run's INSERT.
REFUSED_FAST = "RWQ01"
# The run's counter row, in its INSERT after the fast path (``rawsql.insert_sql`` expressions).
DEPTH_SHARD_SQL = "CAST(current_setting('runwarden.depth_shard') AS smallint)"


def queue_place_fast_sql(tenant_id: int, *, refuse: bool) -> tuple[str, list[Any]]:
    """The fast path's statement (ending in ``;``) and its parameters; ``refuse``: raise
    (SQLSTATE ``REFUSED_FAST``) rather than answer NULL where it does not apply, so that
    statements after it in the same round trip never run."""
    return (
        "SELECT runs_queue_place_fast(%s, %s, %s, %s, %s);",
        [tenant_id, random.randrange(SHARDS), _default_limit(), SHARDS, refuse],
    )


_SLOW_SQL = (
    "ROLLBACK TO SAVEPOINT runwarden_depth;"  # releases the row the fast attempt locked, if any
    " INSERT INTO runs_queuedepth (tenant_id, shard, unfinished)"
    f"  SELECT %s, g, 0 FROM generate_series(0, {SHARDS - 1}) g ON CONFLICT (tenant_id, shard) DO NOTHING;"
    " SELECT 1 FROM runs_queuedepth WHERE tenant_id = %s ORDER BY shard FOR UPDATE;"
    " SELECT (SELECT coalesce(sum(unfinished), 0) FROM runs_queuedepth WHERE tenant_id = %s),"
    "  (SELECT max_queue_depth FROM core_tenantquota WHERE tenant_id = %s)"
)


def queue_place_take(tenant: Tenant) -> int:
    """Take a place for one more unfinished run of ``tenant`` in the current transaction, or
    raise QuotaExceeded. Returns the counter row (``Run.depth_shard``) to count the run on; the
    row stays locked until the transaction ends, and the trigger counts the run when inserted."""
    if not connection.in_atomic_block:
        raise RuntimeError("a queue place is taken in the transaction that creates the run")
    if not rawsql.on_postgresql():
        _refuse_when_full(tenant, _count_unfinished(tenant), None)
        return 0
    fast, params = queue_place_fast_sql(tenant.pk, refuse=False)
    with connection.cursor() as cursor:
        # A savepoint, left open on success (it ends with the transaction).
        cursor.execute(f"SAVEPOINT runwarden_depth; {fast}", params)
        shard = cursor.fetchone()[0]
    if shard is not None:
        return int(shard)
    with connection.cursor() as cursor:
        # Every row, in shard order (as queue_places_hold_all does), then the exact sum.
        cursor.execute(_SLOW_SQL, [tenant.pk, tenant.pk, tenant.pk, tenant.pk])
        depth, limit = cursor.fetchone()
    _refuse_when_full(tenant, depth, limit)
    return random.randrange(SHARDS)  # every row is held: any will do


def queue_places_hold_all(tenant_id: int) -> None:
    """Lock every counter row of a tenant, in shard order, to the end of the transaction: the
    starts holding a place commit first, and the starts after this transaction read what it
    wrote (a changed ``max_queue_depth``: core.services.tenant_quota_update)."""
    if rawsql.on_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT 1 FROM runs_queuedepth WHERE tenant_id = %s ORDER BY shard FOR UPDATE", [tenant_id]
            )


def _refuse_when_full(tenant: Tenant, depth: int, limit: int | None) -> None:
    if limit is None:
        limit = TenantQuota.objects.filter(tenant=tenant).values_list("max_queue_depth", flat=True).first()
    limit = _default_limit() if limit is None else limit
    if depth >= limit:
        raise QuotaExceeded(tenant, depth, limit)


def _count_unfinished(tenant: Tenant) -> int:
    return Run.objects.filter(tenant=tenant, status__in=UNFINISHED_RUN_STATUSES).count()


def queue_depth_miscounts() -> list[str]:
    """Counter rows that disagree with the runs they count (PostgreSQL), one line each. Both
    sides are read in one statement, so one snapshot: a start or finish in flight cannot show."""
    if not rawsql.on_postgresql():
        return []
    unfinished = ", ".join(["%s"] * len(UNFINISHED_RUN_STATUSES))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(c.tenant_id, r.tenant_id), coalesce(c.shard, r.depth_shard),"
            "  coalesce(c.unfinished, 0), coalesce(r.n, 0)"
            " FROM runs_queuedepth c FULL JOIN ("
            f"  SELECT tenant_id, depth_shard, count(*) AS n FROM runs_run WHERE status IN ({unfinished})"
            "  GROUP BY tenant_id, depth_shard) r ON r.tenant_id = c.tenant_id AND r.depth_shard = c.shard"
            " WHERE coalesce(c.unfinished, 0) <> coalesce(r.n, 0) ORDER BY 1, 2",
            list(UNFINISHED_RUN_STATUSES),
        )
        return [
            f"tenant {tenant_id}'s queue-depth counter {shard} says {counted} unfinished runs; {actual} are"
            for tenant_id, shard, counted, actual in cursor.fetchall()
        ]
