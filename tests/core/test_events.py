from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction

from core import services
from core.models import AppendOnlyError, Event, Tenant

pytestmark = pytest.mark.django_db


def test_the_model_refuses_to_change_or_delete_an_event(acme: Tenant) -> None:
    event = services.event_record(tenant=acme, subject="s:1", verb="created", actor="t")
    event.verb = "tampered"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()


@pytest.mark.parametrize(
    "sql", ["UPDATE core_event SET verb = 'tampered' WHERE id = %s", "DELETE FROM core_event WHERE id = %s"]
)
def test_the_database_refuses_to_change_or_delete_an_event(acme: Tenant, sql: str) -> None:
    event = services.event_record(tenant=acme, subject="s:1", verb="created", actor="t")
    with (
        pytest.raises(DatabaseError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, [event.pk])
    assert Event.objects.get(pk=event.pk).verb == "created"


def test_bulk_queryset_update_and_delete_are_refused_too(acme: Tenant) -> None:
    services.event_record(tenant=acme, subject="s:1", verb="created", actor="t")
    with pytest.raises(DatabaseError), transaction.atomic():
        Event.objects.update(verb="x")
    with pytest.raises(DatabaseError), transaction.atomic():
        Event.objects.all().delete()
    assert Event.objects.filter(verb="created").count() == 1


def test_listeners_run_only_after_commit(acme: Tenant, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    services.event_listener_register(lambda e: seen.append(e.pk))
    try:
        with django_capture_on_commit_callbacks(execute=True):
            event = services.event_record(tenant=acme, subject="s:1", verb="created", actor="t")
            assert seen == []
        assert seen == [event.pk]
    finally:
        services._event_listeners.pop()
