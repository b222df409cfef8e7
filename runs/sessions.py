"""Sessions: runs of one tenant with one ``session_key`` (a conversation, a thread, a user)
execute at most ``max_concurrent`` at a time, whole run after whole run, in start order or
in ``sequence`` order.

A session run starts ``waiting``: its steps are all pending, so it holds no worker, lease
or capacity. Only the active dispatcher moves runs out of the queue (``session_round``, at
the start of every admission round, under the round lock): it expires runs past their
queue deadline and promotes the next runs of each session that has room — their first
unfinished step becomes ready and is admitted in that same round. A run leaves ``active``
in the same statement that finishes it (``transitions.session_release``), which wakes the
dispatcher for the next one.

Every write is conditional on the state it leaves (``session_state='waiting'``), and step
rows are written before run rows, the order a cancel uses, so a racing cancel and a
promotion never deadlock and never both win.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from core import rawsql, tracing
from core import services as core_services
from runs import transitions
from runs.definitions import SessionPolicy
from runs.models import IN_A_SESSION, Run, SessionState
from runs.transitions import run_cancel_in_transaction

logger = logging.getLogger(__name__)

MAX_SESSION_KEY_LENGTH = 200
MAX_PROMOTIONS_PER_ROUND = 500


class SessionOverflow(Exception):
    """The session already has as many waiting runs as its workflow allows (overflow reject)."""

    def __init__(self, session_key: str, waiting: int, limit: int) -> None:
        super().__init__(
            f"session {session_key!r} is busy: {waiting} run(s) already wait and the workflow "
            f"allows {limit} (overflow: reject)"
        )
        self.session_key = session_key
        self.waiting = waiting
        self.limit = limit
        self.retry_after = 5


def session_runs_of(tenant_id: int, session_key: str) -> QuerySet[Run]:
    """The runs of one session, asked as its index (``run_in_session``) can answer."""
    return Run.objects.filter(IN_A_SESSION, tenant_id=tenant_id, session_key=session_key)


def session_admit(*, tenant_id: int, session_key: str, policy: SessionPolicy, actor: str) -> None:
    """Make room for one more run in a session, inside the starting transaction, per the
    workflow's overflow policy: refuse it (SessionOverflow) or cancel the oldest waiting runs.

    Starts of one session are serialized by a transaction-scoped advisory lock on the session,
    so two racing starts never both take the last waiting place.
    """
    limit = policy.waiting_limit
    if limit is None:
        return
    if rawsql.on_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7411003))", [f"{tenant_id}:{session_key}"]
            )
    session = session_runs_of(tenant_id, session_key)
    active = session.filter(session_state=SessionState.ACTIVE).count()
    waiting = list(session.filter(session_state=SessionState.WAITING).order_by("sequence", "id"))
    if active + len(waiting) < policy.max_concurrent or len(waiting) < limit:
        return
    if policy.overflow == "reject":
        raise SessionOverflow(session_key, len(waiting), limit)
    for oldest in waiting[: len(waiting) - limit + 1]:
        # Conditional on still waiting: a run the dispatcher promoted meanwhile keeps running.
        run_cancel_in_transaction(
            run=oldest,
            actor=actor,
            reason="replaced by a newer run of its session (cancel_oldest_waiting)",
            only_waiting=True,
        )


@dataclass(frozen=True)
class _Waiting:
    run_id: str
    tenant_id: int
    session_key: str
    sequence: int | None
    created_at: datetime
    gap_seconds: float
    place: int
    room: int  # session_max minus the session's active runs
    last_sequence: int | None
    last_finished: datetime | None
    traceparent: str  # the run's trace (core.tracing)

    @property
    def gap_ends(self) -> datetime:
        """When this run stops waiting for missing sequence numbers: the gap counts from when
        it could otherwise have started (it arrived, or the run before it finished)."""
        since = max(self.created_at, self.last_finished or self.created_at)
        return since + timedelta(seconds=self.gap_seconds)


def _runs_wait_for_a_turn() -> bool:
    """Whether any run waits for its session's turn: every admission round asks first, under
    the whole admission lock, so it is one prepared statement (the session index's partial
    range), not an ORM query built each time."""
    rows = rawsql.fetch_rows(_ANY_WAITING_SQL, [])
    return bool(rows[0][0])


_ANY_WAITING_SQL = (
    f"SELECT EXISTS (SELECT 1 FROM {Run._meta.db_table} WHERE session_state = "
    f"{rawsql.sql_strings(SessionState.WAITING)})"
)


def session_round(now: datetime) -> tuple[bool, datetime | None]:
    """Expire waiting runs past their deadline, then promote the runs whose turn it is. Call
    inside the admission round's transaction. Returns whether runs still wait for a turn (so
    a run finishing must wake the dispatcher), and when a waiting run's deadline or a
    sequence gap's timeout next needs a round."""
    if not _runs_wait_for_a_turn():
        return False, None
    _expire(now)
    promote: list[str] = []
    next_due: datetime | None = None
    expected: dict[tuple[int, str], int] = {}
    blocked: set[tuple[int, str]] = set()
    for row in _waiting_with_room():
        session = (row.tenant_id, row.session_key)
        if session in blocked or row.place > row.room:
            continue
        if session not in expected:  # sequences count from 1 in every session
            expected[session] = 1 if row.last_sequence is None else row.last_sequence + 1
        want = expected[session]
        if row.sequence is not None and row.sequence > want:
            gap_ends = row.gap_ends
            if gap_ends > now:  # the missing numbers may still arrive
                blocked.add(session)
                next_due = gap_ends if next_due is None else min(next_due, gap_ends)
                continue
            core_services.event_record(
                tenant=row.tenant_id,
                subject=f"run:{row.run_id}",
                verb="session_sequence_gap_skipped",
                actor="dispatcher",
                payload={"session_key": row.session_key, "expected": want, "sequence": row.sequence},
            )
        if row.sequence is not None:
            expected[session] = max(row.sequence, want) + 1
        promote.append(row.run_id)
        _turn_traced(row, now)
    transitions.session_runs_promote(promote, now)
    still_waiting = Run.objects.filter(session_state=SessionState.WAITING).exclude(pk__in=promote).exists()
    deadline = (
        Run.objects.filter(session_state=SessionState.WAITING, queue_deadline__isnull=False)
        .order_by("queue_deadline")
        .values_list("queue_deadline", flat=True)
        .first()
    )
    if deadline is not None:
        next_due = deadline if next_due is None else min(next_due, deadline)
    return still_waiting, next_due


def _turn_traced(row: _Waiting, now: datetime) -> None:
    """The span of a session's run waiting for its turn, from its start to its promotion, in
    its run's trace (recorded when the round commits)."""
    if not tracing.enabled() or not row.traceparent:
        return
    attributes = {
        "runwarden.run_id": row.run_id,
        "runwarden.session_key": row.session_key,
        "runwarden.waited_for": "session",
        "runwarden.waited_seconds": round(max(0.0, (now - row.created_at).total_seconds()), 3),
        **({"runwarden.sequence": row.sequence} if row.sequence is not None else {}),
    }
    transaction.on_commit(
        lambda: tracing.span_recorded(
            row.traceparent, "session turn", start=row.created_at, end=now, attributes=attributes
        )
    )


# A session's runs that took their turn (running now, or finished).
_PASSED_STATES = rawsql.sql_strings(SessionState.ACTIVE, SessionState.DONE, SessionState.DROPPED)


# Waiting runs in session order, with their place, their session's room and what it passed.
WAITING_WITH_ROOM_SQL = f"""
    WITH waiting AS (
        SELECT id, tenant_id, session_key, sequence, created_at, session_gap_seconds,
               session_max, traceparent,
               row_number() OVER (
                   PARTITION BY tenant_id, session_key ORDER BY sequence NULLS LAST, id
               ) AS place
        FROM runs_run WHERE session_state = '{SessionState.WAITING.value}'
    ),
    sessions AS (SELECT DISTINCT tenant_id, session_key FROM waiting),
    passed AS (
        SELECT r.tenant_id, r.session_key,
               count(*) FILTER (WHERE r.session_state = '{SessionState.ACTIVE.value}') AS active,
               max(r.sequence) AS last_sequence,
               max(r.finished_at) AS last_finished
        FROM runs_run r JOIN sessions s USING (tenant_id, session_key)
        -- IN_A_SESSION, as run_in_session's condition reads: a join's keys cannot prove it
        WHERE r.session_state IN ({_PASSED_STATES}) AND NOT (r.session_key = '')
        GROUP BY r.tenant_id, r.session_key
    )
    SELECT w.id AS run_id, w.tenant_id, w.session_key, w.sequence, w.created_at,
           w.session_gap_seconds AS gap_seconds, w.place,
           w.session_max - coalesce(p.active, 0) AS room, p.last_sequence, p.last_finished,
           w.traceparent
    FROM waiting w LEFT JOIN passed p USING (tenant_id, session_key)
    WHERE w.place <= w.session_max - coalesce(p.active, 0)
    -- Every session's next run first, then the ones after: a session that cannot go on
    -- (a sequence gap) never crowds the others out of the batch.
    ORDER BY w.place, w.tenant_id, w.session_key
    LIMIT %s
    """


def _waiting_with_room() -> list[_Waiting]:
    """Waiting runs in session order, with their place, their session's free room and the
    last sequence number the session passed (started, or left the queue)."""
    with connection.cursor() as cursor:
        cursor.execute(WAITING_WITH_ROOM_SQL, [MAX_PROMOTIONS_PER_ROUND])
        names = [column[0] for column in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:  # compared with aware datetimes; SQLite returns text or naive ones
        row["created_at"] = rawsql.read_datetime(row["created_at"])
        row["last_finished"] = rawsql.read_datetime(row["last_finished"])
    return [_Waiting(**row) for row in rows]


def _expire(now: datetime) -> None:
    """Waiting runs past their queue deadline end ``expired`` with the reason."""
    due = list(
        Run.objects.filter(session_state=SessionState.WAITING, queue_deadline__lte=now).values_list(
            "pk", "tenant_id", "session_key", "created_at"
        )[:MAX_PROMOTIONS_PER_ROUND]
    )
    if not due:
        return
    transitions.session_runs_expire(due, now)


def session_place(run: Run) -> int | None:
    """A waiting run's place in its session's queue (1: next), else None."""
    if run.session_state != SessionState.WAITING:
        return None
    ahead = session_runs_of(run.tenant_id, run.session_key).filter(session_state=SessionState.WAITING)
    if run.sequence is None:
        ahead = ahead.filter(Q(sequence__isnull=False) | Q(id__lt=run.id))
    else:
        ahead = ahead.filter(Q(sequence__lt=run.sequence) | Q(sequence=run.sequence, id__lt=run.id))
    return ahead.count() + 1


def session_summary(run: Run) -> dict[str, Any] | None:
    if not run.session_key:
        return None
    return {
        "key": run.session_key,
        "sequence": run.sequence,
        "state": run.session_state,
        "place": session_place(run),
    }


def session_runs(*, tenant_id: int, session_key: str) -> list[Run]:
    """A session's runs in session order: sequence (when given), then start order."""
    runs = session_runs_of(tenant_id, session_key)
    return sorted(runs, key=lambda r: (r.sequence is None, r.sequence or 0, r.id))


def queue_deadline(policy: SessionPolicy, now: datetime | None = None) -> datetime | None:
    if policy.queue_timeout_seconds is None:
        return None
    return (now or timezone.now()) + timedelta(seconds=policy.queue_timeout_seconds)
