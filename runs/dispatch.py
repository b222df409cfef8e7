"""Admission: which ready steps may run now. One round admits a batch in a few set-based
statements, inside one transaction:

1. the admission lock, transaction-scoped advisory locks: a round takes all 8 shards, so
   the holder counts below cannot grow behind its back (a worker admitting its own next
   step takes one shard, and one more per further step it admits at once, see
   ``admit_here``);
2. one grouped query counts the live holders of every scope (global, tenant, workflow, lane,
   tool) and of every worker pool; scopes already at their cap are left out of step 3;
3. one query picks candidates fairly: tenants round-robin by weight, and per entity key only
   the oldest waiter (FIFO per key), whose keys nobody holds — a step blocked by a lock or a
   full cap is not a candidate, so it never holds back the steps behind it;
4. in memory, each candidate takes room in every scope and a free worker slot of its lane;
   keys taken earlier in the round are skipped (FIFO again);
5. candidate rows are locked (``SKIP LOCKED``), and ONE statement grants every step lease and
   entity lock of the round, ONE more marks the steps leased;
6. after commit, one task per admitted step goes to its lane's queue.

A step that cannot be admitted because of its own data or definition (a workflow no longer
registered, a lock key no lease can carry) fails with its reason in a savepoint of its own;
if the batch statements fail anyway, the round admits step by step so the culprit fails
alone. Nothing one run carries can stop the round for the others.

A step lease granted here lasts ``RUNWARDEN_PICKUP_TIMEOUT_SECONDS``; the worker that picks
the step up renews it to the step's own lease length, so a step's lease never runs out while
its task waits in the broker.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from itertools import takewhile
from typing import Any

from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, OperationalError, connection, transaction
from django.db.models import Min, Q
from django.utils import timezone

from core import metrics, rawsql, tallies, tracing
from core.leases import (
    LeaseGrant,
    LeaseRequest,
    lease_revoke,
    leases_acquire_many,
    leases_release,
    live_lease_sql,
    live_leases_filter,
)
from core.models import Lease
from core.wakeups import (
    mark_left_waiting,
    mark_unsaturated,
    mark_waiting,
    waiters_added,
    wake_now,
    wake_on_commit,
)
from core.workers import Pool, live_pools
from runs import transitions
from runs.definitions import LANES, REGISTRY, UnknownWorkflow, get_workflow
from runs.locking import ready_steps_lock
from runs.models import Step, StepStatus, ToolCallStatus
from runs.queueing import enqueue_steps
from runs.services import run_cancel_by_id
from runs.sessions import session_round

logger = logging.getLogger(__name__)

# The admission lock: ADMISSION_SHARDS pg advisory locks, (ROUND_LOCK_ID, 0..n-1) in the
# two-key space (apart from the single-key ids elsewhere: the dispatcher's own). A round takes
# them all, in order; a worker admitting its own next step as it finishes one takes any one
# (admission_shard_sql), and one more per further step it admits at once, never waiting for
# those (_more_shards): each shard held carries at most one admission in flight, so each
# admits only where every cap it counts against leaves room for one per shard (admit_here's
# headroom).
ROUND_LOCK_ID = 7_411_001
ADMISSION_SHARDS = 8


@dataclass(frozen=True)
class Admission:
    step_id: int
    token: int
    lane: str
    # Known to a worker's own admission on PostgreSQL (``admit_here``): what it will start, and
    # where (its place).
    workflow: str = ""
    workflow_version: str = ""
    key: str = ""
    place: Place | None = None
    # Started already by the statement that admitted it (``admit_here``'s ``starts``).
    started: transitions.Started | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Candidate:
    step_id: int
    tenant_id: int
    run_id: str
    key: str
    lane: str
    tool: str
    workflow: str
    lock_keys: tuple[Any, ...]  # strings, unless the data is corrupt (then it fails alone)
    lock_policy: str
    weight: int = 1
    workflow_version: str = ""
    ready_since: datetime | None = None  # when it became ready: a lock wait is measured from it
    traceparent: str = ""  # its run's trace (core.tracing): the admission's span goes there

    def place(self) -> Place:
        return (self.tenant_id, self.workflow, self.lane, self.tool)

    def scopes(self) -> list[str]:
        return [
            "global",
            f"tenant:{self.tenant_id}",
            f"workflow:{self.workflow}",
            f"lane:{self.lane}",
            *([f"tool:{self.tool}"] if self.tool else []),
            *tenant_scopes(self.tenant_id, self.workflow, self.lane, self.tool),
        ]


# What a step counts against (its tenant, workflow, lane and tool): two steps of one place count
# in exactly the same scopes, so one finishing and the other admitted in the same transaction
# leave every count as it was.
Place = tuple[int, str, str, str]


# A tenant's own caps per workflow, lane and tool (TenantQuota.caps) are scopes of their own.
TENANT_SCOPE_KINDS = ("workflow", "lane", "tool")


def tenant_scopes(tenant_id: int, workflow: str, lane: str, tool: str) -> list[str]:
    return [
        f"tenant_workflow:{tenant_id}:{workflow}",
        f"tenant_lane:{tenant_id}:{lane}",
        *([f"tenant_tool:{tenant_id}:{tool}"] if tool else []),
    ]


@dataclass
class Room:
    """Live holders per scope and per lane, the caps, and the worker pools: what is free."""

    caps: dict[str, int]
    held: Counter[str]
    lane_held: Counter[str]
    pools: list[Pool]
    tenant_cap_default: int

    def cap(self, scope: str) -> int | None:
        if scope.startswith("tenant:"):
            return self.caps.get(scope, self.tenant_cap_default)
        return self.caps.get(scope)

    def full(self, scope: str) -> bool:
        cap = self.cap(scope)
        return cap is not None and self.held[scope] >= cap

    def worker_room(self, lane: str, headroom: int = 1) -> bool:
        """Room in the workers of ``lane`` (for ``headroom`` steps): the pools consuming it,
        minus what is admitted on every lane those pools also consume. Each slot takes
        ``RUNWARDEN_WORKER_PREFETCH`` admissions (1 by default: a busy worker pulls its next step
        itself as it finishes one; a step admitted ahead of it would wait in the broker). With
        no pool announced at all, caps alone apply."""
        if not self.pools:
            return True
        serving = [pool for pool in self.pools if lane in pool.queues]
        if not serving:
            return False
        lanes = set().union(*(pool.queues for pool in serving))
        slots = sum(pool.slots for pool in serving) * settings.RUNWARDEN_WORKER_PREFETCH
        return sum(self.lane_held[name] for name in lanes) + headroom <= slots

    def fits(self, candidate: Candidate, headroom: int = 1, slot_headroom: int = 1) -> bool:
        """Room for ``candidate`` in every scope it counts against, and a worker slot. With
        ``headroom`` n: room for n such admissions in every capped scope (n - 1 made unseen at
        the same time, under the other shards of the admission lock); ``slot_headroom`` alike
        in the lane's worker slots (a worker taking its next step frees its own slot: 1)."""
        return not any(
            (cap := self.cap(scope)) is not None and self.held[scope] + headroom > cap
            for scope in candidate.scopes()
        ) and self.worker_room(candidate.lane, slot_headroom)

    def take(self, candidate: Candidate) -> None:
        for scope in candidate.scopes():
            self.held[scope] += 1
        self.lane_held[candidate.lane] += 1


@dataclass
class _Round:
    now: datetime
    admitted: list[Admission] = field(default_factory=list)
    cancel: list[tuple[str, str]] = field(default_factory=list)  # (run_id, reason) after commit
    conflicts: Counter[tuple[int, str]] = field(default_factory=Counter)  # tallied once per round


def wait_for_round_lock() -> None:
    """Take the whole admission lock (every shard, in order) for the rest of the transaction,
    waiting for a round or the workers' own admissions in progress."""
    if rawsql.on_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(
                "; ".join(
                    f"SELECT pg_advisory_xact_lock({ROUND_LOCK_ID}, {n})" for n in range(ADMISSION_SHARDS)
                )
            )


def shard_headroom() -> int:
    """How many workers' own admissions may be in flight at once, unseen by each other: one per
    shard on PostgreSQL; SQLite lets one writer in at a time."""
    return ADMISSION_SHARDS if rawsql.on_postgresql() else 1


def admission_shard_sql() -> str:
    """A statement taking one shard of the admission lock for the rest of the transaction: the
    first free one from a random start, else (a round holds them all) waiting for that one.
    Holding one shard only, a worker never waits on another while it holds one: no deadlock
    with a round taking them all in order."""
    start = random.randrange(ADMISSION_SHARDS)
    return (
        f"SELECT CASE WHEN EXISTS (SELECT 1 FROM generate_series(0, {ADMISSION_SHARDS - 1}) n"
        f" WHERE pg_try_advisory_xact_lock({ROUND_LOCK_ID}, mod(n + {start}, {ADMISSION_SHARDS})))"
        f" THEN 1 ELSE (SELECT 1 FROM (SELECT pg_advisory_xact_lock({ROUND_LOCK_ID}, {start})) taken) END; "
    )


def _adapt(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def load_room(
    now: datetime,
    *,
    pools_max_age: float = 0.0,
    tool: str = "",
    prelude_sql: tuple[str, Sequence[Any]] = ("", ()),
) -> Room:
    """Count live holders (admitted steps whose lease is live, governed calls running with a
    live slot) per scope in one query. ``pools_max_age``: how old this process's last read of
    the worker pools may be. ``tool``: only that tool's holders are counted (a call's slot
    looks at its tool's scopes alone, and the count stays short under the admission lock).
    ``prelude_sql``: statements run first in the same round trip (a shard of the admission
    lock, taken before the count as ever)."""
    only = "AND s.tool = %s" if tool else ""
    sql = f"""
        SELECT s.tenant_id, r.workflow, s.lane, s.tool, COUNT(*)
        FROM runs_step s
        JOIN runs_run r ON r.id = s.run_id
        JOIN core_lease l ON l.id = s.lease_id AND l.token = s.lease_token
        WHERE s.status IN ({rawsql.sql_strings(*transitions.ADMITTED)}) AND {live_lease_sql("l")} {only}
        GROUP BY s.tenant_id, r.workflow, s.lane, s.tool
        UNION ALL
        SELECT t.tenant_id, '', '', t.tool, COUNT(*)
        FROM runs_toolcall t
        JOIN core_lease l ON l.id = t.lease_id AND l.token = t.lease_token
        WHERE t.status = '{ToolCallStatus.RUNNING.value}' AND {live_lease_sql("l")} {only.replace("s.", "t.")}
        GROUP BY t.tenant_id, t.tool
        UNION ALL
        SELECT tenant_id, NULL, NULL, CAST(caps AS text), max_concurrent_steps FROM core_tenantquota
    """
    held: Counter[str] = Counter()
    lane_held: Counter[str] = Counter()
    quotas: list[tuple[int, int, Any]] = []
    with connection.cursor() as cursor:
        at = _adapt(now)
        params = [at, tool, at, tool] if tool else [at, at]
        rawsql.execute_prepared(
            cursor, sql, params, without_bitmap_scans=True, without_seq_scans=True, prelude_sql=prelude_sql
        )
        for tenant_id, workflow, lane, tool, n in cursor.fetchall():
            if workflow is None:  # a tenant's quota row: (tenant, max concurrent steps, caps)
                quotas.append((tenant_id, n, _json_dict(tool)))
                continue
            if workflow == "":  # governed calls running (runs.tools): they count on their tool only
                held[f"tool:{tool}"] += n
                held[f"tenant_tool:{tenant_id}:{tool}"] += n
                continue
            scopes = ["global", f"tenant:{tenant_id}", f"workflow:{workflow}", f"lane:{lane}"]
            scopes += [f"tool:{tool}"] if tool else []
            for scope in [*scopes, *tenant_scopes(tenant_id, workflow, lane, tool)]:
                held[scope] += n
            lane_held[lane] += n
    configured = settings.RUNWARDEN_CAPS
    caps = {"global": configured["global"]}
    for kind in ("workflow", "lane", "tool"):
        caps.update({f"{kind}:{name}": cap for name, cap in configured.get(kind, {}).items()})
    for tenant_id, cap, own in quotas:
        caps[f"tenant:{tenant_id}"] = cap
        for kind in TENANT_SCOPE_KINDS:
            for name, value in ((own or {}).get(kind) or {}).items():
                caps[f"tenant_{kind}:{tenant_id}:{name}"] = int(value)
    return Room(caps, held, lane_held, live_pools(max_age=pools_max_age), configured["tenant_default"])


def _in_clause(column: str, values: Iterable[Any], params: list[Any]) -> str:
    values = list(values)
    if not values:
        return ""
    params.extend(values)
    return f" AND {column} NOT IN ({', '.join(['%s'] * len(values))})"


def fair_candidates(
    *,
    limit: int,
    now: datetime | None = None,
    room: Room | None = None,
    only_step: int | None = None,
    lanes: Iterable[str] = (),
    wait_policy_only: bool = False,
) -> list[Candidate]:
    """Ready steps that could be admitted now, in weighted fair-share order: by (what the
    tenant holds now + its place among its own candidates) / its weight, so tenants take turns
    by weight whatever their number or ids.

    Left out: steps in a scope that is full, steps with ``wait`` locks someone holds, and
    every waiter for an entity key but the oldest (FIFO per key, by step id: the steps of a
    run are created when it starts, so id order is start order).
    """
    now = now or timezone.now()
    on_postgresql = rawsql.on_postgresql()
    named = on_postgresql and only_step is not None  # one step: a statement of its own
    params: list[Any] = [_adapt(now)]
    exclusions = ""
    if room is not None:
        full = [scope for scope in {*room.held, *room.caps} if room.full(scope)]
        exclusions += _in_clause(
            # On PostgreSQL, against the lateral's tenant: a tenant at its cap is then skipped
            # whole (a one-time filter), not step by step.
            "t.tenant_id" if on_postgresql and not named else "s.tenant_id",
            [int(s.split(":", 1)[1]) for s in full if s.startswith("tenant:")],
            params,
        )
        exclusions += _in_clause(
            "r.workflow", [s.split(":", 1)[1] for s in full if s.startswith("workflow:")], params
        )
        no_workers = [lane for lane in LANES if not room.worker_room(lane)]
        exclusions += _in_clause(
            "s.lane", [s.split(":", 1)[1] for s in full if s.startswith("lane:")] + no_workers, params
        )
        exclusions += _in_clause(
            "s.tool", [s.split(":", 1)[1] for s in full if s.startswith("tool:")], params
        )
        column = {"workflow": "r.workflow", "lane": "s.lane", "tool": "s.tool"}
        for scope in sorted(s for s in full if s.startswith("tenant_")):
            kind, tenant_id, name = scope.removeprefix("tenant_").split(":", 2)
            exclusions += f" AND NOT (s.tenant_id = %s AND {column[kind]} = %s)"
            params.extend([int(tenant_id), name])
    if only_step is not None and not named:
        exclusions += " AND s.id = %s"
        params.append(only_step)
    if wait_policy_only:  # a worker's own pull: other lock policies are the dispatcher's to apply
        exclusions += " AND s.lock_policy = %s"
        params.append("wait")
    lanes = sorted(lanes)
    if lanes:
        exclusions += f" AND s.lane IN ({', '.join(['%s'] * len(lanes))})"
        params.extend(lanes)
    # Weighted fair shares: a tenant's n-th candidate would be its (held + n)-th step at once.
    held = json.dumps(
        [
            [int(scope[7:]), n]
            for scope, n in (room.held.items() if room else ())
            if scope.startswith("tenant:") and n
        ]
    )
    params += [_adapt(now), held, limit]
    if named:
        params = [only_step, *params[:-2], _adapt(now)]  # the older waiters' due time, then the leases'
        sql = _NAMED_CANDIDATE_SQL.format(exclusions=exclusions)
    elif on_postgresql:
        # The same rule, found per tenant: each tenant's oldest ready steps by index, so a
        # round or a worker's pull costs what it takes, not a pass over every ready step.
        params = [_adapt(now), *params[:-2], limit, held, limit]
        sql = _FAIR_CANDIDATES_SQL.format(exclusions=exclusions)
    else:
        sql = _fair_candidates_portable(exclusions)
    with connection.cursor() as cursor:
        rawsql.execute_prepared(cursor, sql, params)
        names = [column[0] for column in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    return [
        Candidate(
            **{name: row[name] for name in _CANDIDATE_COLUMNS if name not in ("lock_keys", "ready_since")},
            lock_keys=tuple(_json_list(row["lock_keys"])),
            ready_since=rawsql.read_datetime(row["ready_since"]),
            weight=row["weight"],
        )
        for row in rows
    ]


# A candidate's fields and the columns they come from: both statements below select these
# under these names, and fair_candidates builds each Candidate from them by name.
_CANDIDATE_COLUMNS = {
    "step_id": "s.id",
    "tenant_id": "s.tenant_id",
    "run_id": "s.run_id",
    "key": "s.key",
    "lane": "s.lane",
    "tool": "s.tool",
    "workflow": "r.workflow",
    "lock_keys": "s.lock_keys",
    "lock_policy": "s.lock_policy",
    "workflow_version": "r.workflow_version",
    # Nothing writes a ready step's row but its admission: its last write is when it became ready.
    "ready_since": "s.updated_at",
    "traceparent": "r.traceparent",
}
_CANDIDATE_SELECT = ", ".join(f"{column} AS {name}" for name, column in _CANDIDATE_COLUMNS.items())


def _candidate_names(alias: str) -> str:
    return ", ".join(f"{alias}.{name}" for name in _CANDIDATE_COLUMNS)


_READY = rawsql.sql_strings(StepStatus.READY)


# FIFO per key in one pass: the oldest ready waiter of every key is its head; a step is a
# candidate only where it heads every key it needs.
_FIFO = """
    AND ({keyless} OR NOT EXISTS (
        SELECT 1 FROM {unnest} JOIN heads h ON h.tenant_id = s.tenant_id AND h.lock_key = {key_col}
        WHERE h.head <> s.id))
"""
# A step with ``wait`` locks is left out while any of its keys is held.
_KEYS_FREE = """
    AND ({keyless} OR s.lock_policy <> 'wait' OR NOT EXISTS (
        SELECT 1 FROM {unnest}
        WHERE EXISTS (
            SELECT 1 FROM core_lease l
            WHERE l.tenant_id = s.tenant_id AND l.key = {key_col}
            AND {live})))
"""
_FIFO_AND_FREE = _FIFO + _KEYS_FREE
_POSTGRESQL_KEYS = {
    "keyless": "jsonb_array_length(s.lock_keys) = 0",
    "live": live_lease_sql("l"),
    "unnest": "jsonb_array_elements_text(s.lock_keys) AS k(key)",
    "key_col": "k.key",
}

# PostgreSQL: the tenants with ready steps by a skip scan of the (status, tenant, id) index,
# then each tenant's first ``limit`` candidates in id order (a lateral index scan that stops
# there), interleaved by weight. Heads come from the keyed ready steps alone (a partial index).
_FAIR_CANDIDATES_SQL = (
    f"""
    WITH RECURSIVE tenants AS (
        (SELECT tenant_id FROM runs_step WHERE status = {_READY} ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT s.tenant_id FROM runs_step s WHERE s.status = {_READY} AND s.tenant_id > t.tenant_id
                ORDER BY s.tenant_id LIMIT 1)
        FROM tenants t WHERE t.tenant_id IS NOT NULL
    ), heads AS MATERIALIZED (
        SELECT s.tenant_id, k.key AS lock_key, MIN(s.id) AS head
        FROM runs_step s, jsonb_array_elements_text(s.lock_keys) AS k(key)
        WHERE s.status = {_READY} AND NOT (s.lock_keys = '[]'::jsonb)
        AND (s.available_at IS NULL OR s.available_at <= %s)
        GROUP BY s.tenant_id, k.key
    )
    SELECT {_candidate_names("c")}, COALESCE(q.weight, 1) AS weight
    FROM (
        SELECT c.*, ROW_NUMBER() OVER (PARTITION BY c.tenant_id ORDER BY c.step_id) AS rn
        FROM tenants t CROSS JOIN LATERAL (
            SELECT {_CANDIDATE_SELECT}
            FROM runs_step s
            JOIN runs_run r ON r.id = s.run_id
            WHERE s.status = {_READY} AND s.tenant_id = t.tenant_id
            AND (s.available_at IS NULL OR s.available_at <= %s) {{exclusions}}
    """
    + _FIFO_AND_FREE.format(**_POSTGRESQL_KEYS)
    + """
            ORDER BY s.id
            LIMIT %s
        ) c
    ) c
    LEFT JOIN core_tenantquota q ON q.tenant_id = c.tenant_id
    LEFT JOIN (
        SELECT (e->>0)::bigint AS tenant_id, (e->>1)::bigint AS held FROM jsonb_array_elements(%s::jsonb) AS e
    ) h ON h.tenant_id = c.tenant_id
    ORDER BY (COALESCE(h.held, 0) + c.rn - 1) * 1.0 / COALESCE(q.weight, 1), c.tenant_id, c.step_id
    LIMIT %s
"""
)


# PostgreSQL, one named step (a worker's own next step, a key's next holder, a step an approval
# resumed): the same rules for that step alone, its place at the head of each of its keys
# checked against the older keyed waiters of its own tenant (a partial index, stopping at the
# first that shares a key) instead of against the heads of every key of every tenant.
_NAMED_CANDIDATE_SQL = f"""
    SELECT {_CANDIDATE_SELECT}, COALESCE(q.weight, 1) AS weight
    FROM runs_step s
    JOIN runs_run r ON r.id = s.run_id
    LEFT JOIN core_tenantquota q ON q.tenant_id = s.tenant_id
    WHERE s.id = %s AND s.status = {_READY}
    AND (s.available_at IS NULL OR s.available_at <= %s) {{exclusions}}
    AND (jsonb_array_length(s.lock_keys) = 0 OR NOT EXISTS (
        SELECT 1 FROM runs_step o
        WHERE o.status = {_READY} AND NOT (o.lock_keys = '[]'::jsonb)
        AND o.tenant_id = s.tenant_id AND o.id < s.id
        AND (o.available_at IS NULL OR o.available_at <= %s)
        AND o.lock_keys ?| ARRAY(SELECT jsonb_array_elements_text(s.lock_keys))))
    """ + _KEYS_FREE.format(**_POSTGRESQL_KEYS)


def _fair_candidates_portable(exclusions: str) -> str:
    """``_FAIR_CANDIDATES_SQL`` for SQLite (the embedded mode): no lateral joins, so one pass
    over the ready steps with a window per tenant."""
    fifo_and_free = _FIFO_AND_FREE.format(
        keyless="json_array_length(s.lock_keys) = 0",
        unnest="json_each(s.lock_keys) AS k",
        key_col="k.value",
        live=live_lease_sql("l"),
    )
    return f"""
        WITH ready AS (
            SELECT s.id, s.tenant_id, s.run_id, s.key, s.lane, s.tool, s.lock_keys, s.lock_policy,
                   s.updated_at
            FROM runs_step s
            WHERE s.status = {_READY} AND (s.available_at IS NULL OR s.available_at <= %s)
        ), heads AS (
            SELECT s.tenant_id, k.value AS lock_key, MIN(s.id) AS head
            FROM ready s, json_each(s.lock_keys) AS k
            GROUP BY s.tenant_id, k.value
        )
        SELECT {_candidate_names("ranked")}, weight FROM (
            SELECT {_CANDIDATE_SELECT},
                   ROW_NUMBER() OVER (PARTITION BY s.tenant_id ORDER BY s.id) AS rn,
                   COALESCE(q.weight, 1) AS weight
            FROM ready s
            JOIN runs_run r ON r.id = s.run_id
            LEFT JOIN core_tenantquota q ON q.tenant_id = s.tenant_id
            WHERE 1 = 1 {exclusions}
            {fifo_and_free}
        ) ranked
        LEFT JOIN (
            SELECT json_extract(value, '$[0]') AS tenant_id, json_extract(value, '$[1]') AS held
            FROM json_each(%s)
        ) h ON h.tenant_id = ranked.tenant_id
        ORDER BY (COALESCE(h.held, 0) + rn - 1) * 1.0 / weight, ranked.tenant_id, ranked.step_id
        LIMIT %s
    """


def _json_list(value: Any) -> list[Any]:
    if isinstance(value, str):  # SQLite returns JSON as text
        value = json.loads(value)
    return list(value or [])


def _json_dict(value: Any) -> dict[str, Any]:
    value = json.loads(value) if isinstance(value, str) else value
    return value if isinstance(value, dict) else {}


def _unadmittable_reason(candidate: Candidate) -> str:
    """Why a step can never be admitted as it is (its own data or definition), or ''."""
    return _undefined_reason(candidate) or _lock_keys_reason(candidate)


def _undefined_reason(candidate: Candidate) -> str:
    """Why a step's definition (its workflow, version and key) cannot run any more, or ''."""
    if candidate.workflow not in REGISTRY:
        return f"workflow {candidate.workflow!r} is no longer registered"
    try:
        definition = get_workflow(candidate.workflow, candidate.workflow_version)
    except UnknownWorkflow as gone:
        return str(gone)
    try:
        definition.spec(candidate.key)
    except UnknownWorkflow:
        return f"workflow {candidate.workflow!r} no longer has a step {candidate.key!r}"
    return ""


def _lock_keys_reason(candidate: Candidate) -> str:
    """Why a step's lock keys (its own data, perhaps corrupt) can be no lease's key, or ''."""
    for key in candidate.lock_keys:
        if not transitions.valid_lock_key(key):
            return f"lock key {str(key)[:60]!r} is not a valid key"
    return ""


def _fail_unadmittable(candidate: Candidate, reason: str, state: _Round) -> None:
    """Fail one step (and its run) with its reason, in a savepoint of its own."""
    try:
        with transaction.atomic():
            step = Step.objects.get(pk=candidate.step_id)
            transitions.step_fail(
                step=step,
                actor="dispatcher",
                reason=f"cannot be admitted: {reason}",
                from_statuses=[StepStatus.READY],
                now=state.now,
            )
    except Exception:
        logger.exception("could not fail unadmittable step %s", candidate.step_id)


def _held_keys(candidate: Candidate, now: datetime) -> list[str]:
    live = Lease.objects.filter(
        live_leases_filter(now), tenant_id=candidate.tenant_id, key__in=list(candidate.lock_keys)
    )
    return list(live.values_list("key", flat=True))


# Why a newcomer whose entity is held gives way, by lock policy.
GIVE_WAY = {
    "skip": "skipped: an entity it needs is locked by another run",
    "cancel_newest": "cancelled: an older run holds the entity (cancel_newest)",
}


def _plan(candidates: list[Candidate], room: Room, state: _Round) -> list[Candidate]:
    """Pick, in fair order, the candidates that fit; handle lock policies other than ``wait``."""
    chosen: list[Candidate] = []
    taken: set[tuple[int, str]] = set()
    for candidate in candidates:
        reason = _unadmittable_reason(candidate)
        if reason:
            _fail_unadmittable(candidate, reason, state)
            continue
        keys = {(candidate.tenant_id, key) for key in candidate.lock_keys}
        if keys & taken:
            taken |= keys  # FIFO: a later waiter for these keys waits too
            continue
        if not room.fits(candidate):
            taken |= keys
            continue
        if candidate.lock_policy != "wait" and candidate.lock_keys:
            held = _held_keys(candidate, state.now)
            if held:
                metrics.LOCK_CONFLICTS.inc()
                state.conflicts[(candidate.tenant_id, tallies.LOCK_CONFLICTS)] += 1
                if candidate.lock_policy == "cancel_in_progress":
                    _preempt(candidate, held, state)
                else:
                    state.cancel.append((candidate.run_id, GIVE_WAY[candidate.lock_policy]))
                    taken |= keys
                    continue
        room.take(candidate)
        taken |= keys
        chosen.append(candidate)
    return chosen


def _preempt(candidate: Candidate, held: list[str], state: _Round) -> None:
    """cancel_in_progress: revoke the holders' leases (fencing them out) and cancel their runs."""
    holders = (
        Lease.objects.filter(tenant_id=candidate.tenant_id, key__in=held)
        .values_list("metadata__run_id", flat=True)
        .distinct()
    )
    lease_revoke(tenant_id=candidate.tenant_id, keys=held, now=state.now)
    for run_id in holders:
        if run_id and run_id != candidate.run_id:
            state.cancel.append((run_id, f"cancelled: preempted by {candidate.run_id} (cancel_in_progress)"))


def _grant(chosen: list[Candidate], state: _Round) -> list[Admission]:
    """Lock the chosen rows, grant their leases and locks in one statement, mark them leased in
    one more. A step that lost a key to someone outside the round (a step body's ``ctx.lock``)
    gives back what it got and stays ready."""
    if not chosen:
        return []
    locked = ready_steps_lock([c.step_id for c in chosen])
    chosen = [c for c in chosen if c.step_id in locked]
    ttl = float(settings.RUNWARDEN_PICKUP_TIMEOUT_SECONDS)
    requests = []
    for c in chosen:
        metadata = {"run_id": c.run_id, "step_id": c.step_id, "step_key": c.key}
        holder = f"{c.run_id}:{c.key}"
        requests.append(LeaseRequest(c.tenant_id, f"step:{c.step_id}", holder, ttl, metadata))
        requests += [LeaseRequest(c.tenant_id, key, holder, ttl, metadata) for key in c.lock_keys]
    # In one canonical order, as locks_acquire takes them: no two writers cross.
    grants = leases_acquire_many(sorted(requests, key=lambda r: (r.tenant_id, r.key)), now=state.now)
    admitted: list[Admission] = []
    leased: list[transitions.LeasedStep] = []
    give_back: list[LeaseGrant] = []
    counted: Counter[tuple[int, str]] = Counter()  # the tenants' overview tallies
    for c in chosen:
        mine = [grants.get((c.tenant_id, key)) for key in (f"step:{c.step_id}", *c.lock_keys)]
        if any(grant is None for grant in mine):
            give_back += [grant for grant in mine if grant is not None]
            if mine[0] is None:
                metrics.RETRIES_BLOCKED_BY_LEASE.inc()  # a live lease still owns the step
                counted[(c.tenant_id, tallies.RETRIES_BLOCKED_BY_LEASE)] += 1
            continue
        step_lease, *locks = [grant for grant in mine if grant is not None]
        leased.append(transitions.LeasedStep(step_id=c.step_id, lease=step_lease, locks=locks))
        admitted.append(Admission(step_id=c.step_id, token=step_lease.token, lane=c.lane))
        if c.lock_keys and c.ready_since is not None:
            # How long it waited for its entity locks (and its turn behind earlier waiters).
            waited = max(0.0, (state.now - c.ready_since).total_seconds())
            metrics.LOCK_WAIT_SECONDS.observe(waited)
            counted[(c.tenant_id, tallies.lock_wait_bucket(waited))] += 1
        admission_traced(c, state.now)
    leases_release(give_back, now=state.now)
    tallies.tally_add(counted, now=state.now)
    transitions.steps_lease(leased, now=state.now)
    return admitted


# A step admitted within this long of becoming ready did not wait for anything but its round.
ADMITTED_AT_ONCE_SECONDS = 0.1


def admission_traced(c: Candidate, now: datetime) -> None:
    """The span of the step's wait for admission, from ready to admitted, in its run's trace
    (recorded when the admitting transaction commits). What it waited for: its entity locks
    (held, or its turn behind earlier waiters of a key) when it has any, else capacity — a
    cap or a free worker slot."""
    if not tracing.enabled() or not c.traceparent or c.ready_since is None:
        return
    waited = max(0.0, (now - c.ready_since).total_seconds())
    waited_for = "nothing" if waited < ADMITTED_AT_ONCE_SECONDS else ("lock" if c.lock_keys else "capacity")
    attributes = {
        "runwarden.run_id": c.run_id,
        "runwarden.step_key": c.key,
        "runwarden.lane": c.lane,
        "runwarden.tool": c.tool,
        "runwarden.waited_for": waited_for,
        "runwarden.waited_seconds": round(waited, 3),
    }
    ready_since = c.ready_since
    transaction.on_commit(
        lambda: tracing.span_recorded(
            c.traceparent, f"admission {c.key}", start=ready_since, end=now, attributes=attributes
        )
    )


def _grant_isolated(chosen: list[Candidate], state: _Round) -> list[Admission]:
    """The batch failed: admit step by step, each in a savepoint, so the step whose data the
    database refuses fails alone."""
    admitted: list[Admission] = []
    for candidate in chosen:
        try:
            with transaction.atomic():
                admitted += _grant([candidate], state)
        except (DataError, IntegrityError) as exc:  # its own data; a deadlock or timeout is not
            logger.warning("step %s cannot be admitted: %s", candidate.step_id, exc)
            _fail_unadmittable(candidate, f"the database refused its admission ({type(exc).__name__})", state)
    return admitted


@dataclass(frozen=True)
class RoundResult:
    admitted: list[Admission]
    waiting: bool  # ready steps were left waiting for room
    next_due: datetime | None  # the earliest backoff that ends after this round


def admit_round(*, limit: int | None = None) -> RoundResult:
    """One admission round (see the module docstring); enqueues after commit."""
    limit = limit or settings.RUNWARDEN_DISPATCH_BATCH
    since = waiters_added()  # before the round looks at the steps: see mark_waiter_added
    mark_waiting(True)  # until this round says otherwise: releases meanwhile wake the next one
    with transaction.atomic():
        # Wait for the lock rather than try it: finishing workers take it too, and PostgreSQL
        # grants a contended lock to its queue in order, so a try could fail for as long as
        # workers keep finishing — and leave every lane they do not pull from unadmitted.
        wait_for_round_lock()
        state = _Round(now=timezone.now())
        sessions_waiting, session_due = session_round(state.now)
        room = load_room(state.now)
        candidates = [] if room.full("global") else fair_candidates(limit=limit, now=state.now, room=room)
        chosen = _plan(candidates, room, state)
        tallies.tally_add(state.conflicts, now=state.now)
        try:
            with transaction.atomic():
                state.admitted = _grant(chosen, state)
        except DatabaseError:
            logger.exception("a batched admission failed; admitting step by step")
            state.admitted = _grant_isolated(chosen, state)
        waiting, saturated, next_due = _left_behind(state, room)
        waiting = waiting or sessions_waiting  # a run finishing in a session frees a turn
        mark_left_waiting(waiting, since=since)  # before the commit: see core.wakeups.LEFT_WAITING_KEY
        if session_due is not None:
            next_due = session_due if next_due is None else min(next_due, session_due)
        _enqueue_on_commit(state.admitted)
        for run_id, reason in state.cancel:
            transaction.on_commit(partial(run_cancel_by_id, run_id=run_id, actor="dispatcher", reason=reason))
    mark_waiting(waiting, saturated, since=since)
    return RoundResult(state.admitted, waiting, next_due)


def _enqueue_on_commit(admissions: Iterable[Admission]) -> None:
    """Each admitted step's task to its lane's queue once the admitting transaction commits."""
    sends = [(admission.step_id, admission.token, admission.lane) for admission in admissions]
    if sends:
        transaction.on_commit(partial(enqueue_steps, sends))


def _due(now: datetime) -> Q:
    """A step due at ``now``: no retry backoff, or one that has ended (``_DUE_SQL`` in SQL)."""
    return Q(available_at__isnull=True) | Q(available_at__lte=now)


_DUE_SQL = "(available_at IS NULL OR available_at <= %s)"


def _left_behind(state: _Round, room: Room) -> tuple[bool, set[str], datetime | None]:
    """After a round: the lanes whose worker slots are all taken (their workers pull their next
    step themselves), whether other ready steps wait for room a release may free, and when
    the next retry backoff ends."""
    saturated = {lane for lane in LANES if room.pools and not room.worker_room(lane)}
    admitted = [a.step_id for a in state.admitted]
    if rawsql.on_postgresql():  # both in one round trip, planned once (every round asks)
        at = rawsql.adapt_datetime(state.now)
        # With every lane's slots taken no step waits for a slot: not even looked for.
        some_room = not saturated >= set(LANES)
        params = [some_room, admitted, at, sorted(saturated), admitted, at]
        with connection.cursor() as cursor:
            rawsql.execute_prepared(cursor, _LEFT_BEHIND_SQL, params, without_bitmap_scans=True)
            waiting, next_due = cursor.fetchone()
        return waiting, saturated, next_due
    ready = Step.objects.filter(status=StepStatus.READY).exclude(pk__in=admitted)
    waiting = ready.filter(_due(state.now)).exclude(lane__in=saturated).exists()
    next_due = ready.filter(available_at__gt=state.now).aggregate(due=Min("available_at"))["due"]
    return waiting, saturated, next_due


# ``_left_behind``'s two reads: a ready step the round left, due now, in a lane with a free
# slot (not looked for where no lane has one: AND evaluates its subquery only when needed);
# and when the next retry backoff ends.
_LEFT_BEHIND_SQL = f"""
    SELECT %s AND EXISTS (
        SELECT 1 FROM runs_step WHERE status = {_READY} AND NOT (id = ANY (%s::bigint[]))
        AND {_DUE_SQL} AND NOT (lane = ANY (%s::text[]))
    ), (
        SELECT MIN(available_at) FROM runs_step WHERE status = {_READY} AND NOT (id = ANY (%s::bigint[]))
        AND available_at > %s
    )
"""


def dispatch_round(*, limit: int | None = None) -> list[Admission]:
    """Admit what may run now (after any admission in progress) and enqueue it after commit."""
    return admit_round(limit=limit).admitted


# How many candidates a worker's own admission looks at (more than one: other workers may be
# admitting the first ones at the same moment).
PULL_CANDIDATES = 8


def admit_here(
    *,
    lanes: frozenset[str],
    prefer: int | None = None,
    headroom: int = 1,
    released: Sequence[str] = (),
    tenant_id: int | None = None,
    idle_slots: int = 0,
    leaving: Place | None = None,
    leaving_until: datetime | None = None,
    starts: Callable[[Candidate], bool] | None = None,
) -> Admission | None:
    """Admit one step for the calling worker to run straight on, as it finishes another: the
    run's next step (``prefer``) when every cap, FIFO rule and lock allows it, else the ready
    step of its lanes whose tenant holds the least (by weight). None when nothing fits.
    Taking one from its lanes, a worker whose pool has ``idle_slots`` takes up to that many
    more (``_admit_for_idle_slots``) in the same transaction.

    Call inside the finishing transaction holding the admission lock: all of it
    (``wait_for_round_lock``, ``headroom`` 1), or one shard (``admission_shard_sql``, headroom
    ``shard_headroom()``: a step is admitted only where every cap leaves room for that many).
    A busy worker thus pulls its next step without a dispatch round trip; near a cap, the
    dispatcher's round (woken by the caller) admits exactly. ``released``: the entity keys the
    finishing step gave up (of ``tenant_id``): each key's oldest waiter is tried in turn, the
    first this worker can take handed its key in the releasing transaction; the dispatcher is
    woken for the others. ``leaving``: the place
    of the step finishing in this transaction (its release already written), whose lease ran
    until ``leaving_until``: the fairest ready step of that same place may take it over
    (``_takes_over``). ``starts``: which steps the caller starts in this transaction (asked of
    each step definition: its workflow, version and key): the statement admitting such a step
    starts it too (``Admission.started``).
    """
    now = timezone.now()
    # The calling worker is one of the pools, alive: a second-old view of them will do.
    room = load_room(now, pools_max_age=1.0)
    if prefer is not None and (admitted := _admit_named(prefer, now, room, lanes, headroom, starts)):
        return admitted
    waiters = _next_holders(released, tenant_id) if tenant_id is not None else []
    for waiter in waiters:
        if admitted := _admit_named(waiter, now, room, lanes, headroom, starts):
            if len(waiters) > 1:
                wake_on_commit()  # the other keys' next holders: a round gives them their keys
            return admitted
    if waiters:
        wake_on_commit()  # a key's next holder this worker cannot take: a round gives it the key
    idle_slots = min(idle_slots, settings.RUNWARDEN_WORKER_BATCH)
    candidates = fair_candidates(
        limit=PULL_CANDIDATES + idle_slots, now=now, room=room, lanes=lanes, wait_policy_only=True
    )
    # In fair-share order already (what each tenant holds counted): the first that fits and is
    # still free (another worker may admit it meanwhile) wins.
    fitting = _fitting(candidates, room, lanes, headroom)
    first = _admit_first(fitting or _takes_over(room, lanes, leaving, leaving_until, now), now, starts)
    if first is None:
        return None
    candidate, admitted = first
    # Not beside a takeover: no candidate had the headroom for more, and the one taken over,
    # read after ``candidates``, may be a step ready since (not among them).
    if idle_slots and fitting:
        _admit_for_idle_slots(candidates, room, lanes, idle_slots, now, after=candidate, headroom=headroom)
    return admitted


def _more_shards(wanted: int) -> int:
    """Take up to ``wanted`` more shards of the admission lock, none waited for; how many
    shards this transaction holds now. Each shard held carries at most one admission in flight
    unseen by the others (what ``shard_headroom`` counts on), so a worker admits as many steps
    at once as it holds shards, each counted against a room read after it took them."""
    if not rawsql.on_postgresql():
        return wanted + 1  # one writer at a time: nothing is in flight unseen
    start = random.randrange(ADMISSION_SHARDS)
    shard = f"mod(n + {start}, {ADMISSION_SHARDS})"
    with connection.cursor() as cursor:
        cursor.execute(
            # The shards held before (read first: a lock already held would be taken again,
            # re-entrantly, and counted), then those not held tried from a random one on, the
            # OFFSET 0 keeping the filter on the held ones ahead of the tries.
            "WITH held AS MATERIALIZED (SELECT objid::int AS shard FROM pg_locks"
            " WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted"
            f" AND classid = {ROUND_LOCK_ID} AND objsubid = 2),"
            f" taken AS MATERIALIZED (SELECT shard FROM (SELECT {shard} AS shard"
            f" FROM generate_series(0, {ADMISSION_SHARDS - 1}) n"
            f" WHERE {shard} NOT IN (SELECT shard FROM held) OFFSET 0) free"
            f" WHERE pg_try_advisory_xact_lock({ROUND_LOCK_ID}, shard) LIMIT {wanted})"
            " SELECT (SELECT count(*) FROM held) + (SELECT count(*) FROM taken)"
        )
        return int(cursor.fetchone()[0])


def _admit_for_idle_slots(
    candidates: list[Candidate],
    room: Room,
    lanes: frozenset[str],
    count: int,
    now: datetime,
    *,
    after: Candidate,
    headroom: int,
) -> None:
    """Up to ``count`` more of ``candidates`` (after ``after``, in their fair order) for the idle
    slots of the calling worker's pool, granted together (``_grant``) and enqueued after
    commit: one per further shard of the admission lock taken without waiting
    (``_more_shards``), each where every cap leaves ``headroom`` and the lane's worker slots as
    much, in a room read again once those shards are held (an admission made under one of them
    before, committed since, is counted then). Steps without entity keys only: their one lease
    is theirs alone (their row is locked first), and a key's waiters keep their order through
    the usual paths. In a savepoint: a database error here never undoes the finishing step's
    success, nor the step the worker goes on with."""
    lock_free = [c for c in candidates[candidates.index(after) + 1 :] if not c.lock_keys]
    wanted = _fitting(lock_free, room, lanes, headroom, slot_headroom=headroom)[:count]
    if not wanted:
        return  # nothing to take shards for
    try:
        with transaction.atomic():
            shards = _more_shards(len(wanted))
            room = load_room(now, pools_max_age=1.0)  # this transaction's own admission counted too
            picked: list[Candidate] = []
            for c in wanted[: max(0, shards - 1)]:
                if _fitting([c], room, lanes, headroom, slot_headroom=headroom):
                    room.take(c)  # the next one counts this one
                    picked.append(c)
            if not picked:
                return
            admitted = _grant(picked, _Round(now=now))
    except DatabaseError:
        logger.warning("admitting up to %d more steps for idle slots failed", len(wanted), exc_info=True)
        return
    _enqueue_on_commit(admitted)


def admit_directly(step_id: int) -> bool:
    """Admit one step just made ready, in a transaction of its own, as a worker admits its own
    next step (``admit_here``): under one shard of the admission lock, where every cap leaves
    room for ``shard_headroom()`` such admissions; where it fits only exactly (a lane of a few
    slots), under the whole lock, as a round would — waiting for it a moment at most. Only where
    its lane's workers have a free slot (as a worker's own pull sees them), its keys are free
    and it is first in line for each; enqueued after commit. False when it does not fit now: a
    round decides then (``core.direct_admission``)."""
    admitted, fits_only_exactly = _admit_directly_under(step_id, whole_lock=False)
    if admitted is None and fits_only_exactly:
        try:
            admitted, _ = _admit_directly_under(step_id, whole_lock=True)
        except OperationalError as exc:
            if getattr(exc.__cause__, "pgcode", "") != LOCK_NOT_AVAILABLE:
                raise
            return False  # a round or busy workers hold the lock: the round decides
    return admitted is not None


# PostgreSQL's lock_not_available: a lock wait ended by ``lock_timeout``.
LOCK_NOT_AVAILABLE = "55P03"
# How long a direct admission waits for the whole admission lock (a round holds it, or workers
# hold shards) before leaving the step to the round; it runs on a web request's thread.
WHOLE_LOCK_WAIT = "100ms"


def _admit_directly_under(step_id: int, *, whole_lock: bool) -> tuple[Admission | None, bool]:
    """``admit_directly`` under one shard of the admission lock or all of them; and, when not
    admitted, whether it would have fitted exactly (without the other shards' headroom)."""
    with transaction.atomic():
        shard: tuple[str, list[Any]] = ("", [])
        if whole_lock:
            with connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = '{WHOLE_LOCK_WAIT}'")
            wait_for_round_lock()
        else:
            shard = (admission_shard_sql(), [])  # taken in the room's round trip, before its count
        headroom = 1 if whole_lock else shard_headroom()
        now = timezone.now()
        # A second-old view of the worker pools will do.
        room = load_room(now, pools_max_age=1.0, prelude_sql=shard)
        named = fair_candidates(limit=1, now=now, room=room, only_step=step_id, wait_policy_only=True)
        lanes = frozenset(LANES)
        if not _fitting(named, room, lanes, headroom):
            return None, headroom > 1 and bool(_fitting(named, room, lanes, 1))
        admitted = _admit_one(named[0], now)  # None: a round or a worker admitted it meanwhile
        if admitted is not None:
            _enqueue_on_commit([admitted])
    return admitted, False


def _takes_over(
    room: Room, lanes: frozenset[str], leaving: Place | None, leaving_until: datetime | None, now: datetime
) -> list[Candidate]:
    """Where no candidate has the shards' headroom (a cap nearly full): the ready steps that fit
    exactly, in fair order over every lane and lock policy, as long as they are of the place
    ``leaving`` (and a step this worker may take) — the place of the step finishing in this
    transaction, whose release is already written. One of them takes that place over: the
    release and the admission commit together and count in exactly the same scopes, so it
    needs room for itself alone (the next is tried if another worker took the first). That
    holds only while every other reader still counts the finishing step: its lease must have
    been live when any of them read (a round, before this transaction took its shard, never
    after), so with ``TAKEOVER_LEASE_MARGIN`` left at least. A fairer step of another place —
    in any lane — that fits exactly is the round's to admit, under every shard: none from there
    on. So a lane whose cap its workers' slots fill is still served by its own workers, and a
    tenant below its share still gets the next free place."""
    if leaving is None or leaving_until is None or leaving_until <= now + TAKEOVER_LEASE_MARGIN:
        return []
    everyone = fair_candidates(limit=PULL_CANDIDATES, now=now, room=room)
    exact = [c for c in everyone if not _unadmittable_reason(c) and room.fits(c)]
    return list(
        takewhile(lambda c: c.place() == leaving and c.lane in lanes and c.lock_policy == "wait", exact)
    )


# How long the finishing step's lease must still run for its place to be taken over: other
# readers judge it live by their own clocks (another host's may run ahead).
TAKEOVER_LEASE_MARGIN = timedelta(seconds=2)


def _admit_named(
    step_id: int,
    now: datetime,
    room: Room,
    lanes: frozenset[str],
    headroom: int,
    starts: Callable[[Candidate], bool] | None = None,
) -> Admission | None:
    """Admit that one step here, if every cap, FIFO rule and lock allows it now."""
    named = fair_candidates(limit=1, now=now, room=room, only_step=step_id, wait_policy_only=True)
    picked = _fitting(named, room, lanes, headroom)
    return _admit_one(picked[0], now, starts) if picked else None


def _next_holders(keys: Sequence[str], tenant_id: int) -> list[int]:
    """For each key, its oldest ready waiter of the tenant (FIFO per key, by step id)."""
    if not keys:
        return []
    if rawsql.on_postgresql():
        with connection.cursor() as cursor:
            rawsql.execute_prepared(cursor, _NEXT_HOLDERS_SQL, [tenant_id, list(keys)])
            holders = [step_id for (step_id,) in cursor.fetchall()]
    else:  # SQLite has no JSON containment: its few waiters are read in order
        ready = (
            Step.objects.filter(tenant_id=tenant_id, status=StepStatus.READY)
            .exclude(lock_keys=[])
            .order_by("id")
        )
        waiting = list(ready.values_list("id", "lock_keys"))
        holders = [next((pk for pk, held in waiting if key in held), None) for key in keys]
    return list(dict.fromkeys(step_id for step_id in holders if step_id is not None))


# Each key's oldest ready waiter of the tenant, in the keys' order (a key without one: NULL):
# the keyed ready steps of the tenant by id (a partial index), up to the first that needs it.
_NEXT_HOLDERS_SQL = f"""
    SELECT (SELECT s.id FROM runs_step s
            WHERE s.tenant_id = %s AND s.status = {_READY} AND NOT (s.lock_keys = '[]'::jsonb)
            AND s.lock_keys ? k.key ORDER BY s.id LIMIT 1)
    FROM unnest(%s::text[]) WITH ORDINALITY AS k(key, n) ORDER BY k.n
"""


def worker_idle(lanes: frozenset[str]) -> None:
    """A worker found nothing to pull as it finished: its lanes are no longer saturated. A step
    made ready in the moment before that was recorded skipped its wake-up: look once more."""
    mark_unsaturated(lanes)
    if _due_ready_step_in(lanes, timezone.now()):
        wake_now()


def _due_ready_step_in(lanes: frozenset[str], now: datetime) -> bool:
    """Whether a step of ``lanes`` is ready and due. On PostgreSQL one prepared statement: a
    worker asks at the end of every chain, and the ORM's query costs more to build than to run."""
    if not rawsql.on_postgresql():
        return Step.objects.filter(_due(now), status=StepStatus.READY, lane__in=lanes).exists()
    with connection.cursor() as cursor:
        rawsql.execute_prepared(
            cursor, _DUE_READY_SQL, [sorted(lanes), rawsql.adapt_datetime(now)], without_bitmap_scans=True
        )
        return bool(cursor.fetchone()[0])


_DUE_READY_SQL = f"""
    SELECT EXISTS (
        SELECT 1 FROM runs_step WHERE status = {_READY} AND lane = ANY(%s::text[]) AND {_DUE_SQL})
"""


def _fitting(
    candidates: list[Candidate], room: Room, lanes: frozenset[str], headroom: int = 1, slot_headroom: int = 1
) -> list[Candidate]:
    # Each verdict once per call: the candidates of a pull are mostly of one place and one step
    # definition (every candidate of a place fits, or none does).
    fits: dict[Place, bool] = {}
    defined: dict[tuple[str, str, str], bool] = {}

    def fitting(c: Candidate) -> bool:
        if c.lane not in lanes or c.lock_policy != "wait" or _lock_keys_reason(c):
            return False
        definition = (c.workflow, c.workflow_version, c.key)
        if definition not in defined:
            defined[definition] = not _undefined_reason(c)
        if not defined[definition]:
            return False
        place = c.place()
        if place not in fits:
            fits[place] = room.fits(c, headroom, slot_headroom)
        return fits[place]

    return [c for c in candidates if fitting(c)]


def _admit_one(
    candidate: Candidate, now: datetime, starts: Callable[[Candidate], bool] | None = None
) -> Admission | None:
    admitted = _admit_first([candidate], now, starts)
    return admitted[1] if admitted else None


def _admit_first(
    candidates: Sequence[Candidate], now: datetime, starts: Callable[[Candidate], bool] | None = None
) -> tuple[Candidate, Admission] | None:
    """The first of ``candidates`` (in their order) that can be admitted now, and its admission.
    On PostgreSQL each try is one statement over all those left (``transitions.step_lease_first``):
    workers that race for the same oldest steps skip those another admission holds without a
    round trip each. ``starts``: the caller starts such a step in this transaction; when every
    one left is such, the statement starts the one it admits (``Admission.started``)."""
    if not rawsql.on_postgresql():
        for candidate in candidates:
            if admitted := _grant([candidate], _Round(now=now)):
                return candidate, admitted[0]
        return None
    left = list(candidates)
    while left:
        # Asked once per step definition: a pull's candidates are mostly of one.
        start = starts is not None and all(
            starts(c) for c in {(c.workflow, c.workflow_version, c.key): c for c in left}.values()
        )
        # A step started here runs now: its leases last as a running step's do.
        ttl = settings.RUNWARDEN_DEFAULT_LEASE_SECONDS if start else settings.RUNWARDEN_PICKUP_TIMEOUT_SECONDS
        granted_at = timezone.now() if start else now  # a start's leases run from the start itself
        locked, marked, granted, started = transitions.step_lease_first(
            step_ids=[c.step_id for c in left], ttl=float(ttl), now=granted_at, start=start
        )
        if locked is None:
            return None  # each is being admitted by a round or another worker, or no longer ready
        at = next(index for index, c in enumerate(left) if c.step_id == locked)
        if admission := _admission_of(left[at], marked, granted, granted_at, started):
            return left[at], admission
        # A key held elsewhere: those after it may still go (those before it were held by other
        # admissions or no longer ready: tried once, as each candidate is).
        left = left[at + 1 :]
    return None


def _admission_of(
    c: Candidate,
    marked: bool,
    granted: dict[str, LeaseGrant],
    now: datetime,
    started: transitions.Started | None = None,
) -> Admission | None:
    """What ``step_lease_first`` did for ``c``, whose row it locked: its admission, or None (a key
    held elsewhere: the grants it got are given back)."""
    step_key = f"step:{c.step_id}"
    counted: Counter[tuple[int, str]] = Counter()
    if not marked:  # a key is held by someone outside the round: give back what it got
        leases_release(list(granted.values()), now=now)
        if step_key not in granted:
            metrics.RETRIES_BLOCKED_BY_LEASE.inc()  # a live lease still owns the step
            counted[(c.tenant_id, tallies.RETRIES_BLOCKED_BY_LEASE)] += 1
        tallies.tally_add_on_commit(counted, now=now)
        return None
    if c.lock_keys and c.ready_since is not None:
        waited = max(0.0, (now - c.ready_since).total_seconds())
        metrics.LOCK_WAIT_SECONDS.observe(waited)
        counted[(c.tenant_id, tallies.lock_wait_bucket(waited))] += 1
        tallies.tally_add_on_commit(counted, now=now)
    admission_traced(c, now)
    return Admission(
        step_id=c.step_id,
        token=granted[step_key].token,
        lane=c.lane,
        workflow=c.workflow,
        workflow_version=c.workflow_version,
        key=c.key,
        place=c.place(),
        started=started,
    )


def dispatch_until_idle(*, max_rounds: int = 50) -> RoundResult:
    """Rounds until one admits less than a full batch (the rest is blocked or absent)."""
    admitted: list[Admission] = []
    for _ in range(max_rounds):
        result = admit_round()
        admitted += result.admitted
        if len(result.admitted) < settings.RUNWARDEN_DISPATCH_BATCH:
            break
    return RoundResult(admitted, result.waiting, result.next_due)
