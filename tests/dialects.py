"""Which database this test process runs on, and the marks for tests that hold on one only.

``make test-unit`` runs every test on PostgreSQL; ``make test-sqlite`` runs the tests marked
``both_dialects`` again on SQLite, in the embedded default's shape (no DATABASE_URL or
REDIS_URL: a SQLite file, the in-memory channel layer and Celery transport).
"""

from __future__ import annotations

import pytest
from django.conf import settings

ON_SQLITE = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"


def postgresql_only(reason: str) -> pytest.MarkDecorator:
    """A test of a ``both_dialects`` module that only means something on PostgreSQL (worker
    processes, threads racing on row locks, a broker, PostgreSQL's own behaviour)."""
    return pytest.mark.skipif(ON_SQLITE, reason=f"PostgreSQL only: {reason}")


# The reasons tests of ``both_dialects`` modules stay on PostgreSQL.
REAL_WORKERS = postgresql_only(
    "starts worker, dispatcher or beat processes on PostgreSQL and Redis; the embedded default "
    "runs everything in one process"
)
RACING_THREADS = postgresql_only(
    "threads racing for the same rows, which PostgreSQL settles with row locks; SQLite lets one "
    "writer at a time in, so there is no race to check"
)
