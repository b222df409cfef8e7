"""Classifying database errors that a caller may answer by re-reading and retrying."""

from __future__ import annotations

import psycopg2  # type: ignore[import-untyped]
from django.db import DatabaseError

# SQLSTATE class 40 (transaction rollback): PostgreSQL aborted the transaction because of
# what *other* transactions did at the same moment, not because of the statement itself.
DEADLOCK_DETECTED = "40P01"
SERIALIZATION_FAILURE = "40001"
TRANSIENT_CONFLICT_PGCODES = frozenset({DEADLOCK_DETECTED, SERIALIZATION_FAILURE})


def is_transient_conflict(exc: BaseException) -> bool:
    """True when ``exc`` is a PostgreSQL deadlock (40P01) or serialization failure (40001).

    Accepts Django's wrapper (``django.db.OperationalError`` / ``DatabaseError``, whose
    ``__cause__`` is the psycopg2 error carrying ``pgcode``) as well as the raw psycopg2 error,
    and a database error raised ``from`` one of those. Any other exception, including other
    database errors (unique violations, lock timeouts, lost connections, SQLite's "database is
    locked"), gives False.

    Such an error means PostgreSQL rolled the whole transaction back, so nothing it did is
    kept: the caller may run the transaction again (once; the lock order in DESIGN.md makes a
    second collision unlikely), and otherwise the API answers 409 ``concurrent_update``. Retry
    only a whole outermost transaction, never inside an ``atomic`` block that is still open
    (it is aborted too).
    """
    # Django re-raises the driver's error as its own class ``from`` the original, so the
    # pgcode lives one ``__cause__`` down; a raw psycopg2 error carries it itself.
    candidate: BaseException | None = exc
    for _ in range(4):
        if not isinstance(candidate, DatabaseError | psycopg2.Error):
            return False
        if getattr(candidate, "pgcode", None) in TRANSIENT_CONFLICT_PGCODES:
            return True
        candidate = candidate.__cause__
    return False
