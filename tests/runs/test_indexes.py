"""The indexes of runs and steps: every one a row is in costs each of its writes (a status move
rewrites the row into every index), so a run is indexed only where it has something to index,
and the queries that need those partial indexes still find them — on PostgreSQL, and on SQLite
(the embedded default), which uses a partial index only where the query names its condition."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from core import rawsql
from core.models import Tenant, User
from runs import dispatch, locking, selectors, sessions
from runs.models import IN_A_SESSION, Run, SessionState, Step
from runs.services import run_start

pytestmark = pytest.mark.django_db


def test_the_models_and_their_migrations_agree() -> None:
    out = StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out)
    except SystemExit:
        pytest.fail(f"a model change has no migration:\n{out.getvalue()}")


def indexes_of(table: str) -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [table])
        return dict(cursor.fetchall())


def plan(queryset: QuerySet[Run]) -> str:
    """The plan the database picks, with PostgreSQL's sequential scans priced out: which
    index it can use."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL enable_seqscan = off")
        return queryset.explain()


@pytest.fixture
def on_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the indexes' definitions and the round's plan are read from PostgreSQL")


def test_a_run_and_its_steps_are_indexed_only_where_they_have_something_to_index(
    acme: Tenant, on_postgresql: None
) -> None:
    runs = indexes_of(Run._meta.db_table)
    assert "WHERE (finished_at IS NOT NULL)" in runs["run_finished_at"]
    assert "WHERE (NOT ((session_key)::text = ''::text))" in runs["run_in_session"]
    assert "WHERE (replay_of_id IS NOT NULL)" in runs["run_replays"]
    assert not [name for name, definition in runs.items() if definition.endswith("(replay_of_id)")]
    # A step's tenant is read with its status (step_status_tenant), not alone.
    steps = indexes_of(Step._meta.db_table)
    assert not [name for name, definition in steps.items() if definition.endswith("(tenant_id)")]


@pytest.mark.both_dialects
def test_the_queries_that_need_the_partial_indexes_use_them(acme: Tenant, acme_operator: User) -> None:
    first = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    # Each as the code asks it: a session's runs (runs.sessions, the runs list's filter), the
    # overview's finished runs of the last hour (runs.overview), a run's replays (the foreign
    # key's SET_NULL on delete).
    assert "run_in_session" in plan(sessions.session_runs_of(acme.pk, "conversation-1"))
    assert "run_in_session" in plan(selectors.runs_for_user(acme_operator, session_key="conversation-1"))
    since = timezone.now() - timedelta(hours=1)
    assert "run_finished_at" in plan(Run.objects.filter(tenant_id__in=[acme.pk], finished_at__gte=since))
    assert "run_replays" in plan(Run.objects.filter(replay_of__in=[first]))


def test_the_sessions_round_reads_the_sessions_runs_by_their_index(acme: Tenant, on_postgresql: None) -> None:
    """The round's read of what each waiting session passed joins on the session's key, which
    cannot prove the index's condition: it names it."""
    Run.objects.filter(pk=run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run.pk).update(
        session_key="conversation-1", session_state=SessionState.WAITING
    )
    assert IN_A_SESSION.children == [("session_key", "")] and IN_A_SESSION.negated
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sessions.WAITING_WITH_ROOM_SQL}", [sessions.MAX_PROMOTIONS_PER_ROUND])
        found = "\n".join(line for (line,) in cursor.fetchall())
    assert "run_in_session" in found, found


def test_a_rounds_left_behind_read_uses_the_status_index_and_skips_its_scan_where_no_lane_has_room(
    acme: Tenant, on_postgresql: None
) -> None:
    """Every round asks it, planned once (a generic plan, bitmap scans off as it is prepared):
    by the steps' status index, and where every lane's slots are taken the waiting step is not
    looked for at all (the AND never evaluates its subquery)."""
    run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    text, _ = rawsql._numbering(dispatch._LEFT_BEHIND_SQL)
    found = {}
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_bitmapscan = off")
        cursor.execute(f"PREPARE left_behind AS {text}")
        try:
            for some_room in (True, False):
                cursor.execute(
                    "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE left_behind"
                    "(%s, ARRAY[]::bigint[], now(), ARRAY['read']::text[], ARRAY[]::bigint[], now())",
                    [some_room],
                )
                found[some_room] = "\n".join(line for (line,) in cursor.fetchall())
        finally:
            cursor.execute("DEALLOCATE left_behind")
    assert found[True].count("step_status_tenant") == 2, found[True]
    assert "never executed" not in found[True], found[True]
    assert "never executed" in found[False], found[False]  # the waiting step's scan


def _kept_plan(sql: str, params: list[object]) -> str:
    """The plan this connection keeps for ``sql``, prepared by ``rawsql.execute_prepared``."""
    name = rawsql._prepared_on_this_connection().statements[sql].name
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN EXECUTE {name}({', '.join(['%s'] * len(params))})", params)
        return "\n".join(line for (line,) in cursor.fetchall())


def test_a_workers_look_for_due_work_and_a_rounds_row_locks_keep_index_scans(
    acme: Tenant, on_postgresql: None
) -> None:
    """Both are prepared reads of the steps (by status; by id), planned with bitmap scans off
    (``rawsql._plan_without``): a bitmap scan reads every dead version's page."""
    step = Step.objects.get(run=run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run)
    lanes = ["draft", "read"]
    with rawsql.prepared_statements(), transaction.atomic():
        assert dispatch._due_ready_step_in(frozenset(lanes), timezone.now())
        due = _kept_plan(dispatch._DUE_READY_SQL, [lanes, timezone.now()])
        assert locking.ready_steps_lock([step.pk]) == {step.pk}
        lock_sql = f"{locking._READY_STEPS_SQL} FOR NO KEY UPDATE SKIP LOCKED"
        locked = _kept_plan(lock_sql, [[step.pk]])
    assert "Bitmap" not in due and "step_status_tenant" in due, due
    assert "Bitmap" not in locked and "runs_step_pkey" in locked, locked
