from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core import rawsql
from core.models import ApiToken, Event, Tenant, TenantQuota, User
from core.services import api_token_find, api_token_issue, event_record
from runs.models import Run, RunStatus, Step
from runs.services import QuotaExceeded, run_start


def test_placeholders_become_numbered_parameters_in_order() -> None:
    assert rawsql._numbered("a = %s AND b = %s AND c LIKE 'x%%'", [1, 2]) == (
        "a = $1 AND b = $2 AND c LIKE 'x%'",
        [1, 2],
    )
    text, values = rawsql._numbered("a = %(x)s AND b = %(y)s AND c = %(x)s", {"y": 2, "x": 1})
    assert (text, values) == ("a = $1 AND b = $2 AND c = $1", [1, 2])


def _prepared_names() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements")
        return {row[0] for row in cursor.fetchall()}


@pytest.mark.django_db(transaction=True)
def test_a_statement_is_prepared_once_per_connection_only_where_asked_and_answers_as_a_plain_one(
    acme: Tenant,
) -> None:
    sql = "SELECT slug FROM core_tenant WHERE id = %(id)s AND slug LIKE %(pattern)s"
    params = {"id": acme.pk, "pattern": "ac%"}

    def run() -> list[tuple[str]]:
        with connection.cursor() as cursor:
            rawsql.execute_prepared(cursor, sql, params)
            return cursor.fetchall()

    connection.close()  # a connection of its own: earlier tests may have prepared on theirs
    run()  # outside prepared_statements(): planned each time, nothing prepared
    assert not any(name.startswith("rw_") for name in _prepared_names())
    with rawsql.prepared_statements():
        first, second = run(), run()
    assert first == second == [("acme",)]
    assert len([name for name in _prepared_names() if name.startswith("rw_")]) == 1

    connection.close()  # a new connection has nothing prepared: it prepares again
    with rawsql.prepared_statements():
        assert run() == [("acme",)]


@pytest.mark.django_db(transaction=True)
def test_a_start_in_one_round_trip_sends_prepared_statements_where_the_thread_prepares(acme: Tenant) -> None:
    """A new run's rows, written in one round trip (``transaction_in_one_round_trip``), go as
    EXECUTEs of statements prepared once per connection on a thread that prepares; the run is
    the same either way, and a start the fast path refuses (over the quota) still writes
    nothing."""
    connection.close()
    rawsql.prepare_on_this_thread()
    try:
        started = [run_start(tenant=acme, workflow="bench.noop", input={}, actor="t") for _ in range(3)]
        with CaptureQueriesContext(connection) as sent:
            again = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    finally:
        rawsql._preparing.on = False
    [round_trip] = [
        q["sql"] for q in sent.captured_queries if "runs_run" in q["sql"] or "EXECUTE" in q["sql"]
    ]
    assert round_trip.startswith("EXECUTE rw_") and "INSERT" not in round_trip
    for start in [*started, again]:
        run = Run.objects.get(pk=start.run.pk)
        assert run.status == RunStatus.PENDING and run.depth_shard == start.run.depth_shard
        ids = list(run.steps.values_list("pk", flat=True))
        assert len(ids) == 1 and (start.steps is None or ids == [step.pk for step in start.steps])
        assert Event.objects.filter(subject=f"run:{run.pk}", verb="created").count() == 1
    TenantQuota.objects.filter(tenant=acme).update(max_queue_depth=4)
    rawsql.prepare_on_this_thread()
    try:
        with pytest.raises(QuotaExceeded):
            run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    finally:
        rawsql._preparing.on = False
    assert Run.objects.filter(tenant=acme).count() == 4


def _plan_cache_mode() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW plan_cache_mode")
        return str(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_a_connection_starting_run_after_run_prepares_the_start_and_leaves_its_plan_settings_alone(
    acme: Tenant,
) -> None:
    """An integrator's process starting runs in a loop, outside any thread that prepares: the
    start's statements are prepared once the connection has sent them ``PREPARE_AFTER`` times,
    then sent as EXECUTEs; the session's plan_cache_mode is never set; a new connection (a web
    request's) starts unprepared again. The runs are the same either way."""
    connection.close()
    assert not rawsql.preparing()
    started = [
        run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
        for _ in range(rawsql.PREPARE_AFTER)
    ]
    assert not any(name.startswith("rw_") for name in _prepared_names()), "only after PREPARE_AFTER sends"
    with CaptureQueriesContext(connection) as sent:
        started.append(run_start(tenant=acme, workflow="bench.noop", input={}, actor="t"))
    prepares = [q["sql"] for q in sent.captured_queries if q["sql"].startswith("PREPARE rw_")]
    assert len(prepares) >= 4, prepares  # the queue place, the run, its steps, the event (and the read)
    [round_trip] = [
        q["sql"]
        for q in sent.captured_queries
        if ("runs_run" in q["sql"] or "EXECUTE" in q["sql"]) and not q["sql"].startswith("PREPARE")
    ]
    assert round_trip.startswith("EXECUTE rw_") and "INSERT" not in round_trip
    assert len([name for name in _prepared_names() if name.startswith("rw_")]) == len(prepares)
    with CaptureQueriesContext(connection) as sent:
        started.append(run_start(tenant=acme, workflow="bench.noop", input={}, actor="t"))
    assert not any(q["sql"].startswith("PREPARE") for q in sent.captured_queries), "prepared once"
    assert _plan_cache_mode() == "auto", "the caller's session settings are its own"
    for start in started:
        run = Run.objects.get(pk=start.run.pk)
        assert run.status == RunStatus.PENDING and run.depth_shard == start.run.depth_shard
        ids = list(run.steps.values_list("pk", flat=True))
        assert len(ids) == 1 and (start.steps is None or ids == [step.pk for step in start.steps])
        assert Event.objects.filter(subject=f"run:{run.pk}", verb="created").count() == 1

    connection.close()  # a connection of one start prepares nothing
    run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    assert not any(name.startswith("rw_") for name in _prepared_names())


@pytest.mark.django_db(transaction=True)
def test_with_prepared_statements_off_a_connection_never_prepares_the_start(
    acme: Tenant, settings: Any
) -> None:
    settings.RUNWARDEN_PREPARED_STATEMENTS = False  # e.g. behind a transaction-pooling pgbouncer
    connection.close()
    for _ in range(2 * rawsql.PREPARE_AFTER):
        run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    assert not any(name.startswith("rw_") for name in _prepared_names())
    assert Run.objects.filter(tenant=acme).count() == 2 * rawsql.PREPARE_AFTER


@pytest.mark.both_dialects
@pytest.mark.django_db
def test_a_row_read_by_hand_is_the_instance_the_orm_builds(acme: Tenant) -> None:
    event = event_record(tenant=acme, subject="run:x", verb="created", actor="t", payload={"a": [1, None]})
    assert Event.objects.get(pk=event.pk).payload == event.payload == {"a": [1, None]}
    run = Run.objects.create(tenant=acme, workflow="w", actor="t", input={"k": "v"})
    step = Step.objects.create(
        run=run, tenant=acme, key="s", position=0, lane="read", lock_leases=[{"id": 1}]
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {rawsql.select_list(Step, 's')}, {rawsql.select_list(Run, 'r')}"
            " FROM runs_step s JOIN runs_run r ON r.id = s.run_id WHERE s.id = %s",
            [step.pk],
        )
        row = cursor.fetchone()
    by_hand_step = rawsql.from_row(Step, row)
    by_hand_run = rawsql.from_row(Run, row, rawsql.width(Step))
    fetched = Step.objects.get(pk=step.pk)
    for field in Step._meta.concrete_fields:
        assert getattr(by_hand_step, field.attname) == getattr(fetched, field.attname), field.name
    assert by_hand_run.input == {"k": "v"} and by_hand_run.created_at == Run.objects.get(pk=run.pk).created_at


@pytest.mark.both_dialects
@pytest.mark.django_db
def test_a_token_and_its_user_read_by_hand_are_what_the_orm_reads(acme_operator: User) -> None:
    """Dates come back as datetimes on SQLite too (its backend's converters, not only the fields')."""
    raw = api_token_issue(user=acme_operator)
    User.objects.filter(pk=acme_operator.pk).update(last_login=timezone.now())
    ApiToken.objects.filter(user=acme_operator).update(last_used_at=timezone.now())  # not touched now
    found = api_token_find(raw)
    assert found is not None
    fetched = ApiToken.objects.select_related("user").get(pk=found.pk)
    for model, by_hand, by_orm in ((ApiToken, found, fetched), (User, found.user, fetched.user)):
        for field in model._meta.concrete_fields:
            assert getattr(by_hand, field.attname) == getattr(by_orm, field.attname), field.name
    assert isinstance(found.expires_at, datetime) and isinstance(found.user.last_login, datetime)
    assert found.user.is_active is True


@pytest.mark.django_db
def test_an_insert_writes_what_the_orm_would_write(acme: Tenant) -> None:
    """A run and its steps written by ``insert_sql`` read back exactly as built (defaults,
    auto_now_add, JSON), and the steps get their ids from the database."""
    run = Run(id="run_insert_sql", tenant=acme, workflow="bench.five", input={"k": ["v", 1]}, actor="t")
    steps = [
        Step(run=run, tenant=acme, key=f"s{n}", position=n, lane="read", lock_keys=["a:1"] if n else [])
        for n in range(3)
    ]
    sql, params = rawsql.insert_sql([run])
    more, more_params = rawsql.insert_sql(steps)
    with connection.cursor() as cursor:
        cursor.execute(sql + more, params + more_params)
    stored = Run.objects.get(pk=run.pk)
    assert stored.created_at == run.created_at is not None
    assert (stored.input, stored.status, stored.connections) == ({"k": ["v", 1]}, run.status, {})
    assert list(stored.steps.order_by("position").values_list("key", "lock_keys", "status", "attempt")) == [
        (s.key, s.lock_keys, s.status, s.attempt) for s in steps
    ]
    assert all(pk is not None for pk in stored.steps.values_list("pk", flat=True))
    assert not run._state.adding


def _prepared_now() -> tuple[str, datetime]:
    """The one statement this connection has prepared: its name and when it was prepared."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, prepare_time FROM pg_prepared_statements WHERE name LIKE 'rw_%%'")
        (prepared,) = cursor.fetchall()
        return prepared


@pytest.mark.django_db(transaction=True)
def test_a_prepared_statement_is_prepared_again_after_100_then_200_then_400_executions(acme: Tenant) -> None:
    """A generic plan is made from the tables as they are: one made while they were empty (a
    new database, before autovacuum first analyzes it) would read them whole. So the statement
    is prepared (and planned) again after FIRST_REPLAN executions, then after twice as many
    each time, under a new name (the old one goes), and answers the same throughout, inside a
    transaction too."""
    connection.close()  # a connection of its own, with nothing prepared
    sql = "SELECT slug FROM core_tenant WHERE id = ANY(%s)"

    def run() -> list[tuple[str]]:
        with connection.cursor() as cursor:
            rawsql.execute_prepared(cursor, sql, [[acme.pk]])
            return cursor.fetchall()

    def prepared_during(executions: int) -> list[tuple[str, datetime]]:
        seen = []
        for _ in range(executions):
            assert run() == [("acme",)]
            prepared = _prepared_now()
            if not seen or seen[-1] != prepared:
                seen.append(prepared)
        return seen

    try:
        with rawsql.prepared_statements():
            first = prepared_during(rawsql.FIRST_REPLAN)  # executions 1-100: one plan
            second = prepared_during(2 * rawsql.FIRST_REPLAN)  # 101-300
            with transaction.atomic():
                third = prepared_during(4 * rawsql.FIRST_REPLAN)  # 301-700
                assert Tenant.objects.filter(pk=acme.pk).exists()
            fourth = prepared_during(1)  # 701
        assert [len(first), len(second), len(third), len(fourth)] == [1, 1, 1, 1]
        names = [first[0][0], second[0][0], third[0][0], fourth[0][0]]
        assert len(set(names)) == 4 and first[0][1] < second[0][1] < third[0][1] < fourth[0][1]
    finally:
        connection.close()
