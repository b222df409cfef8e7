"""``make run`` with a DATABASE_URL whose database does not exist yet creates it first."""

from __future__ import annotations

import subprocess
import uuid

import psycopg2
import pytest
from django.conf import settings

from tests.servers import base_env, manage


def _admin() -> psycopg2.extensions.connection:
    db = settings.DATABASES["default"]
    conn = psycopg2.connect(dbname="postgres", host=db["HOST"], port=db["PORT"], user=db["USER"])
    conn.autocommit = True
    return conn


def _exists(name: str) -> bool:
    conn = _admin()
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            return cursor.fetchone() is not None
    finally:
        conn.close()


def test_a_missing_database_is_created_once_and_an_existing_one_left_alone() -> None:
    db = settings.DATABASES["default"]
    name = f"runwarden_ensure_{uuid.uuid4().hex[:10]}"
    env = base_env(DEBUG="1", DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{name}")
    try:
        assert not _exists(name)
        first = manage("ensure_database", env=env)
        assert f"Created the PostgreSQL database {name}." in first.stdout
        assert _exists(name)
        again = manage("ensure_database", env=env)
        assert again.stdout == ""  # it exists: nothing to do
        manage("migrate", "--noinput", "-v0", env=env)  # and it is usable
    finally:
        admin = _admin()
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_an_unreachable_server_is_a_clear_error_not_a_traceback() -> None:
    env = base_env(DEBUG="1", DATABASE_URL="postgres://postgres@127.0.0.1:1/runwarden")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        manage("ensure_database", env=env)
    assert "cannot reach PostgreSQL" in failed.value.stderr
    assert "Traceback" not in failed.value.stderr
