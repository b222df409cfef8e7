from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

import tests.runs.workflows_for_tests  # noqa: F401  (the test process knows the test workflows, and the bench's, too)
from core import services
from core.models import Membership, Role, Tenant, TenantQuota, User
from demo.sandbox import seed_sandbox
from demo.seeding import sandbox_connections_create
from tests.runs.cluster import Cluster, wait_for


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On SQLite (``make test-sqlite``) the test database is a file, as the embedded default's
    is: pytest-django's default, a shared in-memory database, gives threads a shared cache that
    fails with "table is locked" instead of waiting for the writer as a file does."""
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("sqlite") / "test.sqlite3")


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's, then, before it drops the test database: the sessions of the processes
    the last test stopped may still be closing, and PostgreSQL refuses to drop a database in use.
    Wait for them a little, then end any left."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        others = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        )

        def none_left() -> bool:
            cursor.execute(others)
            return not cursor.fetchall()

        with suppress(AssertionError):  # still open after 5 s: ended below
            wait_for(none_left, 5, "sessions closing")
        cursor.execute(f"SELECT pg_terminate_backend(pid) FROM ({others}) AS left_open")


@pytest.fixture(scope="session", autouse=True)
def sqlite_flush_like_postgresql() -> Iterator[None]:
    """On SQLite, a transactional test's teardown empties the tables with DELETE where PostgreSQL
    TRUNCATEs them. Two differences follow, both undone here: the append-only trigger on
    ``core_event`` refuses the DELETE (TRUNCATE fires no row trigger), so the flush drops the
    DELETE triggers for its own statements and puts them back; and the one-row fencing counter,
    SQLite's stand-in for PostgreSQL's sequence (which a flush leaves alone), is kept."""
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":
        yield
        return
    from django.db.backends.sqlite3.operations import DatabaseOperations

    flush = DatabaseOperations.execute_sql_flush

    def execute_sql_flush(self: DatabaseOperations, sql_list: list[str]) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND sql LIKE %s", ["% DELETE %"]
            )
            triggers: list[tuple[Any, ...]] = cursor.fetchall()
            for name, _ in triggers:
                cursor.execute(f'DROP TRIGGER "{name}"')
        try:
            flush(self, [sql for sql in sql_list if "core_fencingcounter" not in sql])
        finally:
            with self.connection.cursor() as cursor:
                for _, sql in triggers:
                    cursor.execute(sql)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DatabaseOperations, "execute_sql_flush", execute_sql_flush)
        yield


def make_tenant(slug: str, name: str) -> Tenant:
    """A tenant with its quota and a default sandbox connection per demo provider in production
    and staging (what ``seed_demo`` gives the demo tenants)."""
    tenant = Tenant.objects.create(slug=slug, name=name)
    TenantQuota.objects.create(tenant=tenant)
    sandbox_connections_create(tenant, actor="test")
    return tenant


@pytest.fixture
def acme(db: None) -> Tenant:
    return make_tenant("acme", "Acme Corp")


@pytest.fixture
def globex(db: None) -> Tenant:
    return make_tenant("globex", "Globex Corporation")


def make_member(username: str, tenant: Tenant, role: str) -> User:
    user = User.objects.create_user(username=username, password="pw-" + username)
    Membership.objects.create(user=user, tenant=tenant, role=role)
    return user


@pytest.fixture
def acme_operator(acme: Tenant) -> User:
    return make_member("operator", acme, Role.OPERATOR)


@pytest.fixture
def acme_reviewer(acme: Tenant) -> User:
    return make_member("reviewer", acme, Role.REVIEWER)


@pytest.fixture
def acme_admin(acme: Tenant) -> User:
    return make_member("admin", acme, Role.ADMIN)


@pytest.fixture
def globex_operator(globex: Tenant) -> User:
    return make_member("globex-operator", globex, Role.OPERATOR)


@pytest.fixture
def globex_admin(globex: Tenant) -> User:
    return make_member("globex-admin", globex, Role.ADMIN)


def client_for(user: User) -> Client:
    """A test client logged in as ``user`` (a browser session)."""
    client = Client()
    client.force_login(user)
    return client


def bearer_client(user: User) -> Client:
    """A test client that authenticates with a freshly issued API token."""
    token = services.api_token_issue(user=user, name="test")
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def post_run(client: Client, body: Any, **headers: str) -> Any:
    """POST /api/v1/runs with ``body`` as JSON (a str or bytes body is sent as it is)."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post("/api/v1/runs", data=data, content_type="application/json", headers=headers)


@pytest.fixture
def cluster(transactional_db: None, tmp_path: Path) -> Iterator[Cluster]:
    """Real Celery worker/beat processes on the test database; stopped after the test."""
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sandbox_acme(acme: Tenant) -> Tenant:
    seed_sandbox(acme.pk)
    return acme
