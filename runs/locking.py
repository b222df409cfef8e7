"""The product's one lock order, and the anchor every cold-path action takes first.

A transaction that locks or changes more than one of these rows takes them in this order:

1. the admission lock (advisory locks: all 8 shards, in order, for a dispatch round; one for a
   worker admitting its own next step — it never waits on a second while it holds one, and
   takes further ones only where they are free, for further steps it admits at once);
2. **the run's step rows, by id** — the anchor (see below);
3. lease rows (entity keys in their canonical order) and the run row — every transaction that
   locks both already holds a step row of the run, so their order between them cannot meet;
4. the step's artifact, approval requests and conflicts;
5. the acting member's row (a role checked at the instant of the write, ``core.access``);
6. notifications, events and the outbox (inserts only).

A run's start, as it commits, takes ``FOR SHARE SKIP LOCKED`` on the lease rows of its first
step's entity keys (``held_key_share_sql``): it never waits for one, so it needs no place in
this order.

Tenant-wide settings take the tenant's row (members, ``FOR NO KEY UPDATE``) or its quota row
(``FOR UPDATE``: no row refers to it), then the acting admin's member row, and no step row.

The anchor: every action a person or a timer takes on a run — a decision, an edit of the
artifact, a timeout, a conflict's resolution, a cancel, a retry — starts by locking *all* the
run's step rows (``run_steps_lock``), ordered by id, with ``FOR NO KEY UPDATE``. Two such
actions on one run therefore queue on the same first row and can never hold each other's
locks; rows of step 5 (the artifact, approval requests, conflicts) are only ever changed by a
transaction that holds the anchor, so their order among themselves cannot deadlock. A worker
locks only the one step it runs (its fence), then its leases and the run, which is the same
order from row 2 on; the ready steps it then admits as it finishes are locked with ``SKIP
LOCKED``, never waited for. ``FOR NO KEY UPDATE`` (not ``FOR UPDATE``) lets a worker's insert that
refers to a step (a ledger proposal, a conflict) go on while a person's action holds it: the
foreign-key check takes ``FOR KEY SHARE``, which does not wait for it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection
from django.utils import timezone

from core import rawsql
from core.leases import live_lease_sql
from core.wakeups import mark_waiter_added, wake_unless_saturated
from runs.models import Step, StepStatus

logger = logging.getLogger(__name__)


def step_row_lock(step_id: int) -> tuple[str, list[Any]]:
    """One step's row lock, as a prelude of a worker's fenced write (its end, a checkpoint), so
    it is taken before the lease's row, as a cancel takes them. Nothing on SQLite, which
    serialises writers."""
    if not rawsql.on_postgresql():
        return "", []
    return "SELECT id FROM runs_step WHERE id = %s FOR NO KEY UPDATE; ", [step_id]


def run_steps_lock(run_id: str) -> list[int]:
    """Lock every step row of the run, by id, until the caller's transaction ends (the
    anchor above); the ids, in that order. Call inside ``transaction.atomic()`` before any
    other write of the action. SQLite serialises writers: there it locks nothing."""
    return list(run_steps_locked_statuses(run_id))


def run_steps_locked_statuses(run_id: str) -> dict[int, str]:
    """``run_steps_lock``, and each step's status as read under the lock, by id in that order.
    Hand-written (prepared where the thread prepares): every decision and edit starts here."""
    lock = rawsql.row_lock_clause(" FOR NO KEY UPDATE")
    return dict(
        rawsql.fetch_rows(f"SELECT id, status FROM runs_step WHERE run_id = %s ORDER BY id{lock}", [run_id])
    )


def ready_steps_lock(step_ids: list[int]) -> set[int]:
    """Of these steps, the ones still ready, their rows locked until the caller's transaction
    ends, by id; a row another admission (a round, a worker's pull) holds is skipped, not
    waited for. SQLite serialises writers: there it only reads."""
    if not rawsql.on_postgresql():
        return set(Step.objects.filter(pk__in=step_ids, status=StepStatus.READY).values_list("pk", flat=True))
    if not step_ids:
        return set()
    # Hand-written and prepared where the thread prepares: a round takes these locks under the
    # whole admission lock, and the ORM's statement cost more to build than to run. Planned as
    # an index scan of the primary key (see transitions.step_lease_first on bitmap scans).
    lock = rawsql.row_lock_clause(" FOR NO KEY UPDATE SKIP LOCKED")  # refused outside a transaction
    with connection.cursor() as cursor:
        rawsql.execute_prepared(
            cursor, f"{_READY_STEPS_SQL}{lock}", [list(step_ids)], without_bitmap_scans=True
        )
        return {step_id for (step_id,) in cursor.fetchall()}


_READY_STEPS_SQL = (
    f"SELECT id FROM {Step._meta.db_table} WHERE id = ANY(%s::bigint[])"
    f" AND status = {rawsql.sql_strings(StepStatus.READY)} ORDER BY id"
)


def held_key_share_sql(step: Step, now: datetime) -> tuple[str, list[Any]]:
    """An expression for the transaction that made ``step`` ready, on PostgreSQL: whether it
    waits (lock policy ``wait``) for entity keys held elsewhere, every live lease row of its
    keys locked ``FOR SHARE`` until the transaction ends. The holder's release, which locks
    that row first, then waits for this commit and sees the step as the key's waiter. A row
    being changed (released, renewed, taken over) is skipped, not waited for: the step is then
    not known to wait — nor where any of its keys' rows was skipped. What the caller does with
    the answer: ``wake_for_ready_step``."""
    if step.lock_policy != "wait" or not step.lock_keys:
        return "false", []
    live, params = _live_keys_sql(step, now)
    return (
        f"(SELECT n > 0 AND n = (SELECT count(*) FROM core_lease l WHERE {live})"
        f" FROM (SELECT count(*) AS n FROM (SELECT 1 FROM core_lease l WHERE {live}"
        " FOR SHARE SKIP LOCKED) locked) shared)",
        [*params, *params],
    )


def _live_keys_sql(step: Step, now: datetime) -> tuple[str, list[Any]]:
    """A WHERE fragment for the live leases of ``step``'s keys (lease table ``l``)."""
    return (
        f"l.tenant_id = %s AND l.key = ANY(%s) AND {live_lease_sql('l')}",
        [step.tenant_id, list(step.lock_keys), rawsql.adapt_datetime(now)],
    )


def wake_for_ready_step(step: Step, found_held: bool) -> None:
    """After the commit that made ``step`` ready (a run's start): wake the dispatcher for it —
    unless ``held_key_share_sql`` found it waiting for a key held elsewhere. Then no round is
    needed: a holder finishing on a worker hands the key to its oldest waiter, or wakes a round
    (``runs.dispatch.admit_here``); every other release (a failure, a cancel, a governed
    call's end) wakes a round where the waiting marks are set, and they are set now
    (``core.wakeups.mark_waiter_added``). A release that committed before they were set saw
    none: so the key is read again once they are, and a round is woken if it is free."""
    if found_held and mark_waiter_added():
        live, params = _live_keys_sql(step, timezone.now())
        try:
            if rawsql.fetch_rows(f"SELECT EXISTS (SELECT 1 FROM core_lease l WHERE {live})", params)[0][0]:
                return
        except DatabaseError:  # the start has committed: a round decides
            logger.warning(
                "could not read step %s's keys again; waking the dispatcher", step.pk, exc_info=True
            )
    wake_unless_saturated(step.lane)
