"""The indexes of runs and steps: every one a row is in costs each of its writes (a status move
rewrites the row into every index), so a run is indexed only where it has something to index,
and the queries that need those partial indexes still find them."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from core.models import Tenant
from runs.models import Run, Step
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
    """The plan PostgreSQL picks with sequential scans priced out: which index it can use."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
        return queryset.explain()


@pytest.fixture
def on_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("partial indexes and their plans are PostgreSQL's")


def test_a_run_and_its_steps_are_indexed_only_where_they_have_something_to_index(
    acme: Tenant, on_postgresql: None
) -> None:
    runs = indexes_of(Run._meta.db_table)
    assert "WHERE (finished_at IS NOT NULL)" in runs["run_tenant_finished"]
    assert "WHERE (NOT ((session_key)::text = ''::text))" in runs["run_tenant_session"]
    assert "WHERE (replay_of_id IS NOT NULL)" in runs["run_replays"]
    assert not [name for name, definition in runs.items() if definition.endswith("(replay_of_id)")]
    # A step's tenant is read with its status (step_status_tenant), never alone.
    steps = indexes_of(Step._meta.db_table)
    assert not [name for name, definition in steps.items() if definition.endswith("(tenant_id)")]


def test_the_queries_that_need_the_partial_indexes_use_them(acme: Tenant, on_postgresql: None) -> None:
    first = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    # Each as the code asks it: a session's runs (runs.sessions), the overview's finished runs
    # of the last hour (runs.overview), a run's replays (the foreign key's SET_NULL on delete).
    assert "run_tenant_session" in plan(Run.objects.filter(tenant_id=acme.pk, session_key="conversation-1"))
    since = timezone.now() - timedelta(hours=1)
    assert "run_tenant_finished" in plan(Run.objects.filter(tenant_id__in=[acme.pk], finished_at__gte=since))
    assert "run_replays" in plan(Run.objects.filter(replay_of__in=[first]))
