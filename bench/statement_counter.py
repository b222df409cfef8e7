"""Count the SQL statements (and transactions) each process sends, for ``manage.py bench``.

Off unless ``RUNWARDEN_COUNT_STATEMENTS`` is set to ``"<redis url> <hash key>"``, e.g.
``redis://127.0.0.1:6379/2 runwarden:bench:statements``. Then every database connection the
process opens gets an execute wrapper that counts statements, and a daemon thread adds the
counts to the Redis hash every half second and at exit, under three fields per process role:
``<role>.statements``, ``<role>.transactions`` and ``<role>.connections`` (connections opened).
The role is ``RUNWARDEN_PROCESS_ROLE``, or is derived from the command line (``celery-worker``,
``manage-dispatcher``, ...).

``transactions`` is the client's own count: a statement in autocommit mode is one, an atomic
block that executed something is one when it commits. PostgreSQL's ``pg_stat_database`` stays
the authority; this count says which process the transactions come from. What it cannot see:
each new connection costs PostgreSQL a transaction at backend start, and Django sends ``SET TIME
ZONE`` outside the execute wrappers when the server's zone name differs from ``TIME_ZONE``.

The cost is a lock and two additions per statement (about a microsecond), next to a round trip
to PostgreSQL of a hundred or more: cheap enough not to skew what is measured.

Installed by ``install_if_enabled()`` from ``CoreConfig.ready`` (every process that sets up
Django: web, Celery workers and beat, management commands such as the dispatcher).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

ENV_TARGET = "RUNWARDEN_COUNT_STATEMENTS"
ENV_ROLE = "RUNWARDEN_PROCESS_ROLE"
FLUSH_INTERVAL_SECONDS = 0.5

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_flush_lock = threading.Lock()  # one flush at a time (the thread and atexit)
_statements = 0
_transactions = 0
_connections = 0
_target: tuple[str, str] | None = None
_role = ""
_client: Any = None
_thread: threading.Thread | None = None
_installed = False


def parse_target(value: str) -> tuple[str, str]:
    """``"<redis url> <hash key>"`` -> (url, key)."""
    parts = value.split()
    if len(parts) != 2 or not parts[0].startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{ENV_TARGET} must be '<redis url> <hash key>', not {value!r}")
    return parts[0], parts[1]


def default_role(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else "python"
    words = [a for a in argv[1:] if not a.startswith("-")]
    if program in ("celery", "__main__.py") or "celery" in program:
        sub = next((w for w in words if w in ("worker", "beat", "flower", "shell")), "")
        return f"celery-{sub}" if sub else "celery"
    if program == "manage.py" and words:
        return f"manage-{words[0]}"
    return program.removesuffix(".py") or "python"


def install_if_enabled() -> bool:
    """Start counting when ``RUNWARDEN_COUNT_STATEMENTS`` is set; a no-op otherwise."""
    value = os.environ.get(ENV_TARGET, "").strip()
    if not value:
        return False
    try:
        url, key = parse_target(value)
    except ValueError:
        logger.warning("statement counter not installed", exc_info=True)
        return False
    install(url, key, role=os.environ.get(ENV_ROLE, "") or default_role())
    return True


def install(url: str, key: str, *, role: str) -> None:
    """Count every statement of this process's database connections into ``key`` at ``url``."""
    global _target, _role, _installed
    from django.db import connections
    from django.db.backends.signals import connection_created

    with _lock:
        _target = (url, key)
        _role = role
        if _installed:
            return
        _installed = True
    connection_created.connect(_on_connection_created, dispatch_uid="runwarden-statement-counter")
    for conn in connections.all(initialized_only=True):
        _instrument(conn)
    atexit.register(flush_now)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)
    _start_thread()


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    global _connections
    with _lock:
        _connections += 1
    _instrument(connection)


def _instrument(conn: Any) -> None:
    """Add the counting wrapper to a connection wrapper once (it survives reconnects)."""
    if getattr(conn, "_runwarden_counted", False):
        return
    conn._runwarden_counted = True
    conn._runwarden_dirty = False
    conn.execute_wrappers.append(_count_statement)
    original_commit: Callable[[], Any] = conn._commit
    original_rollback: Callable[[], Any] = conn._rollback

    def _commit() -> Any:
        result = original_commit()
        if conn._runwarden_dirty:
            conn._runwarden_dirty = False
            _add(0, 1)
        return result

    def _rollback() -> Any:
        conn._runwarden_dirty = False
        return original_rollback()

    setattr(conn, "_commit", _commit)  # noqa: B010 (an instance attribute shadowing a method)
    setattr(conn, "_rollback", _rollback)  # noqa: B010


def _count_statement(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Mapping[str, Any]
) -> Any:
    conn = context["connection"]
    result = execute(sql, params, many, context)
    statements = len(params) if many and isinstance(params, list | tuple) else 1
    if conn.get_autocommit():
        _add(statements, 1)
    else:
        conn._runwarden_dirty = True
        _add(statements, 0)
    return result


def _add(statements: int, transactions: int) -> None:
    global _statements, _transactions
    with _lock:
        _statements += statements
        _transactions += transactions


def counts() -> tuple[int, int, int]:
    """Statements, transactions and connections counted in this process and not yet flushed."""
    with _lock:
        return _statements, _transactions, _connections


def flush_now() -> None:
    """Add what was counted since the last flush to the Redis hash (errors are logged, and the
    counts are kept for the next attempt)."""
    with _flush_lock:
        _flush()


def _flush() -> None:
    global _statements, _transactions, _connections, _client
    with _lock:
        statements, transactions, opened = _statements, _transactions, _connections
        target, role = _target, _role
    if target is None or not (statements or transactions or opened):
        return
    try:
        if _client is None:
            import redis

            _client = redis.Redis.from_url(target[0], socket_timeout=2)
        pipe = _client.pipeline(transaction=False)
        pipe.hincrby(target[1], f"{role}.statements", statements)
        pipe.hincrby(target[1], f"{role}.transactions", transactions)
        pipe.hincrby(target[1], f"{role}.connections", opened)
        pipe.execute()
    except Exception:
        logger.debug("statement counter: flush failed", exc_info=True)
        return
    with _lock:
        _statements -= statements
        _transactions -= transactions
        _connections -= opened


def _loop() -> None:
    stop = threading.Event()
    while not stop.wait(FLUSH_INTERVAL_SECONDS):
        flush_now()


def _start_thread() -> None:
    global _thread
    _thread = threading.Thread(target=_loop, name="runwarden-statement-counter", daemon=True)
    _thread.start()


def _after_fork() -> None:
    """A forked child counts for itself: the parent flushes what it counted before the fork."""
    global _statements, _transactions, _connections, _client, _lock, _flush_lock
    _lock = threading.Lock()
    _flush_lock = threading.Lock()
    _statements = _transactions = _connections = 0
    _client = None
    if _installed:
        _start_thread()


def read_totals(client: Any, key: str) -> dict[str, int]:
    """The hash as ``{field: count}`` (for the bench)."""
    raw = client.hgetall(key)
    return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
