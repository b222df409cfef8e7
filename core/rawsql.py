"""Small helpers for the hand-written SQL of the hot path (a step's start and finish, an
admission, an event): model rows read without the ORM's query building, which costs more than
the statement itself when a worker runs hundreds of steps a second.

Only the statement is hand-written: the rows come back as the same model instances the ORM
builds, with the same field conversions (JSON decoded), so everything downstream is unchanged.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any, TypeVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections, models
from django.db.transaction import TransactionManagementError
from django.db.utils import load_backend
from django.utils.dateparse import parse_datetime

M = TypeVar("M", bound=models.Model)


def on_postgresql() -> bool:
    """Multi-statement CTEs, row locks and jsonb functions: PostgreSQL only. The embedded mode's
    SQLite takes the portable path (a few plain statements) instead."""
    return _vendor() == "postgresql"


def _vendor() -> str:
    """The default database's vendor, from its settings: asked a dozen times a step, and
    ``connection.vendor`` goes through a thread-local lookup each time."""
    return _vendor_of(connections.settings[DEFAULT_DB_ALIAS]["ENGINE"])


@cache
def _vendor_of(engine: str) -> str:
    return str(load_backend(engine).DatabaseWrapper.vendor)


def row_lock_clause(clause: str) -> str:
    """``clause`` (``FOR UPDATE`` and its kin) for a hand-written read, as the ORM's
    ``select_for_update``: on PostgreSQL, and only inside a transaction (the lock would end with
    the statement); SQLite serialises writers and has none."""
    if not on_postgresql():
        return ""
    if not connection.in_atomic_block:
        raise TransactionManagementError("a row lock needs a transaction")
    return clause


def sql_strings(*values: str) -> str:
    """``'a', 'b'``: choice values (a status, a policy) written into a statement's text, so a
    statement names them from their enum rather than spelling them again."""
    for value in values:
        if not re.fullmatch(r"[a-z_]+", value):
            raise ValueError(f"not a choice value: {value!r}")
    return ", ".join(f"'{value}'" for value in values)


@cache
def _fields(model: type[models.Model], vendor: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """Each concrete field's attribute name, and the converters the ORM's compiler applies to
    its column on this backend (the backend's, e.g. SQLite's text to datetime, then the
    field's own ``from_db_value``), each with the column expression they expect."""
    fields = model._meta.concrete_fields
    converters = []
    for field in fields:
        column = field.get_col(model._meta.db_table)
        chain = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        converters.append((tuple(chain), column) if chain else None)
    return tuple(field.attname for field in fields), tuple(converters)


@cache
def select_list(model: type[models.Model], alias: str) -> str:
    """``alias.col1, alias.col2, …`` for every concrete field, in the order ``from_row`` reads."""
    return ", ".join(f"{alias}.{field.column}" for field in model._meta.concrete_fields)


def width(model: type[models.Model]) -> int:
    return len(model._meta.concrete_fields)


def from_row(model: type[M], row: tuple[Any, ...] | list[Any], start: int = 0) -> M:
    """The instance the ORM would build from ``row[start:start + width(model)]``."""
    names, converters = _fields(model, _vendor())
    values = [
        _converted(value, conversion)
        for value, conversion in zip(row[start : start + len(names)], converters, strict=True)
    ]
    return model.from_db(DEFAULT_DB_ALIAS, list(names), values)


def _converted(value: Any, conversion: Any) -> Any:
    """A column's value through the ORM's converters for it (none: as it came)."""
    if conversion is not None and value is not None:
        chain, column = conversion
        for convert in chain:
            value = convert(value, column, connection)
    return value


def from_joined_row(row: tuple[Any, ...] | list[Any], *joined: type[models.Model]) -> list[Any]:
    """One instance per model of ``joined``, from a row holding each one's ``select_list`` in
    that order (a hand-written join)."""
    instances, start = [], 0
    for model in joined:
        instances.append(from_row(model, row, start))
        start += width(model)
    return instances


def from_column(model: type[models.Model], name: str, value: Any) -> Any:
    """The value the ORM would give attribute ``name`` of ``model`` for this column value (a
    hand-written read of a few columns)."""
    names, converters = _fields(model, _vendor())
    return _converted(value, converters[names.index(name)])


@cache
def _insert_fields(model: type[models.Model]) -> tuple[models.Field[Any, Any], ...]:
    """The columns an INSERT writes: every concrete field but a database-generated id."""
    return tuple(
        field
        for field in model._meta.concrete_fields
        if not isinstance(field, models.AutoField | models.BigAutoField | models.SmallAutoField)
    )


def insert_sql(
    instances: Sequence[models.Model], *, expressions: Mapping[str, str] | None = None
) -> tuple[str, list[Any]]:
    """One INSERT (ending in ``;``) of these instances of one model, with the values the ORM
    would write (each field's ``pre_save``: defaults, ``auto_now_add``), to send in a round
    trip with other statements. The instances are marked saved. A database-generated id is
    not read back: for rows nothing refers to by id in the same breath (a new run's steps).
    ``expressions``: SQL written in place of a field's value (by field name), for a value only
    an earlier statement of the round trip knows."""
    model = type(instances[0])
    fields = _insert_fields(model)
    expressions = expressions or {}
    # The connection itself, not ``django.db.connection``: every field's preparation reads it,
    # and each read through that proxy is a thread-local lookup (a fifth of a start's CPU).
    db = connections[DEFAULT_DB_ALIAS]
    params: list[Any] = []
    for instance in instances:
        params += [
            field.get_db_prep_save(field.pre_save(instance, True), db)
            for field in fields
            if field.name not in expressions
        ]
        instance._state.adding = False
        instance._state.db = db.alias
    row = f"({', '.join(expressions.get(field.name, '%s') for field in fields)})"
    return (
        f"INSERT INTO {model._meta.db_table} ({_insert_columns(model, db.vendor)}) VALUES"
        f" {', '.join([row] * len(instances))}; ",
        params,
    )


@cache
def _insert_columns(model: type[models.Model], vendor: str) -> str:
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    return ", ".join(quote(field.column) for field in _insert_fields(model))


def transaction_in_one_round_trip(
    statements: Sequence[tuple[str, Sequence[Any]]], *, then: tuple[str, Sequence[Any]] | None = None
) -> Any:
    """Run ``statements`` (SQL without ``;``, and its parameters) as one transaction in a single
    round trip to PostgreSQL, then ``then``, a read in that same transaction whose first row is
    returned (None without one). The statements of one query string are one implicit
    transaction, committed when the last one ends: a transaction Django opens costs a round
    trip for psycopg2's BEGIN and one for its COMMIT besides its statements. Only outside any
    transaction (Django's autocommit, where psycopg2 sends no BEGIN of its own). On an error
    PostgreSQL rolls all of it back, and the error is raised: nothing of it was written. Where
    this thread prepares its statements (``preparing``), each is sent as an ``EXECUTE`` of its
    prepared form (a new run's INSERTs cost PostgreSQL more to parse and plan than to run);
    elsewhere, once this connection has sent it ``PREPARE_AFTER`` times (``_prepared_once_hot``)."""
    if not on_postgresql() or connection.in_atomic_block:
        raise RuntimeError("one round trip needs PostgreSQL and no transaction already open")
    parts = [*statements, *([then] if then else [])]
    texts: list[str] = []
    values: list[Any] = []
    with connection.cursor() as cursor:
        for sql, params in parts:
            if isinstance(params, Mapping):
                raise TypeError("statements sent together take positional parameters only")
            form = (
                _prepared_form(cursor, sql, params)
                if preparing()
                else _prepared_once_hot(cursor, sql, params)
            )
            text, sent = form or (sql, list(params))
            texts.append(text)
            values += sent
        cursor.execute("; ".join(texts), values)
        return cursor.fetchone() if then else None


def adapt_datetime(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def read_datetime(value: Any) -> datetime | None:
    """A timestamp a hand-written query returned, aware: PostgreSQL hands back aware datetimes,
    SQLite text or naive ones (UTC) for a column or an aggregate of one."""
    if isinstance(value, str):
        value = parse_datetime(value)
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def adapt_json(model: type[models.Model], field: str, value: Any) -> Any:
    """A value for a JSON column, adapted as the ORM adapts it for this backend."""
    column = model._meta.get_field(field)
    assert isinstance(column, models.Field)
    return column.get_db_prep_save(value, connection)


MAX_PREPARED = 64  # per connection
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")
_preparing = threading.local()


@contextmanager
def prepared_statements() -> Iterator[None]:
    """Within this block, on this thread, ``execute_prepared`` prepares its statements: the
    step chain of a worker and the dispatcher's rounds, which run the same statements hundreds
    of times on one connection. The web process's request threads, which keep their
    connections too, prepare theirs for their whole life (``prepare_on_this_thread``)."""
    before = getattr(_preparing, "on", False)
    if not before and _preparing_here() and not connection.in_atomic_block:
        # A new connection's session settings, before any transaction. On an error only a plan
        # setting is missed: the caller's own statements meet the outage.
        with suppress(DatabaseError):
            _prepared_on_this_connection()
    _preparing.on = True
    try:
        yield
    finally:
        _preparing.on = before


def among(values: Sequence[Any]) -> tuple[str, list[Any]]:
    """A column's condition of being one of ``values``, written after the column, and its
    parameters: ``= ANY(%s)`` with one array on PostgreSQL (one statement text whatever their
    number, so one prepared statement serves every call), ``IN (%s, ...)`` on SQLite (no arrays)."""
    if on_postgresql():
        return "= ANY(%s)", [list(values)]
    return f"IN ({', '.join(['%s'] * len(values))})", list(values)


def fetch_rows(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The rows a hand-written read returns, run through ``execute_prepared``."""
    with connection.cursor() as cursor:
        execute_prepared(cursor, sql, params)
        return list(cursor.fetchall())


def prepare_on_this_thread() -> None:
    """From now on, ``execute_prepared`` prepares its statements on this thread (a long-lived
    thread keeping its connection: the web process's request threads), as inside
    ``prepared_statements``."""
    _preparing.on = True


def preparing() -> bool:
    """Whether ``execute_prepared`` prepares its statements on this thread now."""
    return _preparing_here() and getattr(_preparing, "on", False)


def _numbered(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> tuple[str, list[Any]]:
    """``sql`` with psycopg2's ``%s`` / ``%(name)s`` placeholders as PostgreSQL's ``$n``, and
    the parameters in that order."""
    text, names = _numbering(sql)
    return text, [params[name] for name in names] if isinstance(params, Mapping) else list(params)


@lru_cache(maxsize=MAX_PREPARED * 4)
def _numbering(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` numbered, and its named placeholders in the order of their numbers (none when
    its placeholders are positional)."""
    order: dict[str, int] = {}
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(0) == "%%":
            return "%"
        if match.group(1) is None:
            count += 1
            return f"${count}"
        return f"${order.setdefault(match.group(1), len(order) + 1)}"

    return _PLACEHOLDER.sub(number, sql), tuple(order)


@dataclass
class _Statement:
    """One statement prepared on a connection: its name now, how many times it was prepared
    (part of the name: no name is used twice), the executions left before it is prepared
    again, and the span after that."""

    name: str
    generation: int
    until_replan: int
    span: int


class _Prepared:
    """What this process prepared on one database connection, by statement text."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.statements: dict[str, _Statement] = {}
        self.generic = False  # plan_cache_mode set for this session
        self.sent_unprepared: dict[str, int] = {}  # by statement text (``_prepared_once_hot``)


def _preparing_here() -> bool:
    return on_postgresql() and bool(settings.RUNWARDEN_PREPARED_STATEMENTS)


def _prepared_on_this_connection(*, generic_plans: bool = True) -> _Prepared:
    here = connections[DEFAULT_DB_ALIAS]  # one thread-local lookup, not one per attribute
    here.ensure_connection()
    state = getattr(here, "_runwarden_prepared", None)
    if state is None or state.raw is not here.connection:  # a new connection
        state = _Prepared(here.connection)
        here._runwarden_prepared = state  # type: ignore[attr-defined]
    if generic_plans and not state.generic and not here.in_atomic_block:
        # Generic plans: these statements' plans do not depend on their values, but with a
        # timestamp among them PostgreSQL's default keeps re-planning every execution (about
        # 1 ms each for the admission query). Set outside a transaction, so no rollback undoes
        # it. It applies to the plans PostgreSQL keeps: this code's prepared statements, and
        # the statements inside PL/pgSQL functions and triggers (the queue place's function and
        # the queue-depth trigger, on small tables of their own: the same plan either way).
        with connection.cursor() as cursor:
            cursor.execute("SET plan_cache_mode = force_generic_plan")
        state.generic = True
    return state


# A generic plan is made from what the tables hold when it is made, and PostgreSQL makes it
# again only once ANALYZE has updated their statistics. On a new database (a new
# installation, a bench's) the tables are empty until autovacuum first analyzes them, a
# minute or more later, and a plan that reads a whole table is the cheapest: a step's start
# read every lease and every run. So a statement is also prepared again after FIRST_REPLAN
# executions, then after twice as many each time, up to every LAST_REPLAN: its plan follows
# the tables' size (PostgreSQL reads it at planning), at one planning per span.
FIRST_REPLAN = 100
LAST_REPLAN = 20_000


def _due_for_replan(statement: _Statement) -> bool:
    statement.until_replan -= 1
    if statement.until_replan > 0:
        return False
    statement.span = statement.until_replan = min(statement.span * 2, LAST_REPLAN)
    return True


def _name_stem(sql: str) -> str:
    return f"rw_{hashlib.sha1(sql.encode()).hexdigest()[:20]}"


def prepared_texts() -> dict[str, str]:
    """The statements this thread's connection has prepared, by their names' stem (every
    generation of one shares it): for a report that shows an ``EXECUTE`` as the SQL it runs."""
    return {_name_stem(sql): sql for sql in _prepared_on_this_connection().statements}


def _prepare(cursor: Any, sql: str, generation: int) -> str:
    """PREPARE ``sql`` on this connection under a name of its own: named after the text, so a
    connection never runs one statement under another's name, and its generation, so a plan
    made again never takes a name in use; the name."""
    name = f"{_name_stem(sql)}_{generation}"
    text, _ = _numbering(sql)
    cursor.execute(f"PREPARE {name} AS {text}")  # no parameters: nothing is interpolated
    return name


def execute_prepared(
    cursor: Any,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any],
    *,
    without_bitmap_scans: bool = False,
    without_seq_scans: bool = False,
    prelude_sql: tuple[str, Sequence[Any]] = ("", ()),
) -> None:
    """Execute ``sql`` as a server-side prepared statement of this connection (PREPARE once,
    then EXECUTE): the hot path's longer statements cost PostgreSQL more to parse and plan
    than to run. Elsewhere (SQLite, or RUNWARDEN_PREPARED_STATEMENTS off, e.g. behind a
    transaction-pooling pgbouncer) a plain execute. ``prelude_sql``: statements (ending in
    ``;``, PostgreSQL only) and their parameters, sent first in the same round trip, unprepared.

    ``without_bitmap_scans``, ``without_seq_scans``: where it is prepared, its plan is made with
    those scans off (``_plan_without``), for a read of the steps by status; a plain execute
    plans as PostgreSQL chooses."""
    first, first_params = prelude_sql
    if not preparing():
        _execute_after(cursor, first, first_params, sql, params)
        return
    prepared = _prepared_form(
        cursor, sql, params, without_bitmap_scans=without_bitmap_scans, without_seq_scans=without_seq_scans
    )
    if prepared is None:  # many variants of one statement: plan the rest each time
        _execute_after(cursor, first, first_params, sql, params)
        return
    execute, values = prepared
    cursor.execute(f"{first}{execute}", [*first_params, *values])


def _prepared_form(
    cursor: Any,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any],
    *,
    without_bitmap_scans: bool = False,
    without_seq_scans: bool = False,
    generic_plans: bool = True,
) -> tuple[str, list[Any]] | None:
    """``sql`` as this connection's ``EXECUTE`` of it (prepared first where it is new, or due
    to be planned again), and its parameters; None once ``MAX_PREPARED`` statements are.
    ``generic_plans``: set this session's plans generic first (``_prepared_on_this_connection``)."""
    state = _prepared_on_this_connection(generic_plans=generic_plans)
    statement = state.statements.get(sql)
    prepared = False
    if statement is None:
        if len(state.statements) >= MAX_PREPARED:
            return None
        statement = state.statements[sql] = _Statement(
            _prepare(cursor, sql, 1), 1, FIRST_REPLAN, FIRST_REPLAN
        )
        prepared = True
    elif _due_for_replan(statement):
        # Prepared anew before the old one goes (PREPARE and DEALLOCATE are not undone by a
        # rollback): if this fails, the old one is still there and still named.
        statement.generation += 1
        old, statement.name = statement.name, _prepare(cursor, sql, statement.generation)
        cursor.execute(f"DEALLOCATE {old}")
        prepared = True
    name = statement.name
    _, values = _numbered(sql, params)
    arguments = ", ".join(["%s"] * len(values))
    execute = f"EXECUTE {name}({arguments})" if values else f"EXECUTE {name}"
    if prepared and (without_bitmap_scans or without_seq_scans) and state.generic:
        _plan_without(cursor, execute, values, bitmap_scans=without_bitmap_scans, seq_scans=without_seq_scans)
    return execute, values


# A connection that is neither a worker's nor a request thread's (an integrator's process
# starting runs in a loop) prepares a statement of the one-round-trip start once it has sent it
# this many times, as pgjdbc's prepareThreshold does: a connection opened for one start (a web
# request's, without CONN_MAX_AGE) never pays for a PREPARE it would not use again.
PREPARE_AFTER = 5


def _prepared_once_hot(
    cursor: Any, sql: str, params: Sequence[Any] | Mapping[str, Any]
) -> tuple[str, list[Any]] | None:
    """``_prepared_form`` of a statement this connection has sent ``PREPARE_AFTER`` times
    unprepared already; None before that (and where nothing is prepared). The session's plan
    settings are the caller's and stay as they are: PostgreSQL's own choice (plan_cache_mode
    auto) settles a start's INSERTs on their generic plan after five custom ones."""
    if not _preparing_here():
        return None
    state = _prepared_on_this_connection(generic_plans=False)
    if sql not in state.statements:
        sent = state.sent_unprepared.get(sql, 0)
        if sent < PREPARE_AFTER:
            if not sent and len(state.sent_unprepared) >= MAX_PREPARED * 4:
                state.sent_unprepared.clear()  # a bound on the texts counted: many rare ones
            state.sent_unprepared[sql] = sent + 1
            return None
        del state.sent_unprepared[sql]
    return _prepared_form(cursor, sql, params, generic_plans=False)


def _execute_after(
    cursor: Any, first: str, first_params: Sequence[Any], sql: str, params: Sequence[Any] | Mapping[str, Any]
) -> None:
    if not first:
        cursor.execute(sql, params)
        return
    if isinstance(params, Mapping):
        raise TypeError("a prelude goes with positional parameters only")
    cursor.execute(f"{first}{sql}", [*first_params, *params])


def _plan_without(
    cursor: Any, execute: str, values: Sequence[Any], *, bitmap_scans: bool, seq_scans: bool
) -> None:
    """Have PostgreSQL make (and keep) a just-prepared statement's generic plan with bitmap
    scans or sequential scans off, the settings back to the session's defaults in the same
    round trip (inside the caller's transaction, or the message's own outside one). ``EXPLAIN EXECUTE``
    makes the generic plan the statement keeps (the session plans generically) without running
    it. A plan PostgreSQL remakes on its own (once ANALYZE or VACUUM has touched a table it
    reads) follows the statistics until the next prepare (``_due_for_replan``); with statistics
    it picks the plain index scans itself. Both are for reads of the steps by status, where the
    index on the status is the one right path whatever the tables hold.

    Bitmap scans: a step leaves one index entry per status it passes through, dead once it moves
    on, until VACUUM removes them. A plain index scan marks each dead entry it meets, and later
    scans skip them; a bitmap scan marks none and reads every one's table page every time. On
    tables whose statistics are missing (a new database, autovacuum off or behind) PostgreSQL
    picks the bitmap scan for a read of the steps by status, and the admission's count of
    admitted steps grew with every step ever run: 0.33 ms after 3,000 one-step runs and 4-8 ms
    after 15,000, against 0.05 and 0.35 ms as a plain index scan (which marks an entry once its
    row is dead to every open transaction).

    Sequential scans: planned while the tables were nearly empty, that count read every lease
    and, for each live one, every step (a nested loop of two sequential scans): one 300-run
    ``agent_io`` on a new database scanned ``runs_step`` 24,581 times, 7.2 million rows,
    before the statement was planned again. Not for every statement: without statistics, with
    sequential scans off, PostgreSQL reads a step or a run by id through the index of its
    status (every ready step, every pending run) as readily as through its primary key. With
    them off, a table read whole all the same (the tenants' quotas) is costed so high that
    PostgreSQL would JIT-compile the statement at every execution (600 ms): JIT is off too."""
    names = [
        *(["enable_bitmapscan"] if bitmap_scans else []),
        *(["enable_seqscan", "jit"] if seq_scans else []),
    ]
    off = "".join(f"SET LOCAL {name} = off; " for name in names)
    back = "".join(f"; SET LOCAL {name} TO DEFAULT" for name in names)
    cursor.execute(f"{off}EXPLAIN {execute}{back}", values)
