import django.db.models.deletion
from django.db import migrations, models

# SQLite alters a column by rebuilding its table, and the rebuild drops the triggers 0002 put on
# core_event: they are put back after the rebuild, forwards and backwards.
SQLITE_APPEND_ONLY = [
    "CREATE TRIGGER IF NOT EXISTS core_event_no_update BEFORE UPDATE ON core_event "
    "BEGIN SELECT RAISE(ABORT, 'core_event is append-only: UPDATE refused'); END;",
    "CREATE TRIGGER IF NOT EXISTS core_event_no_delete BEFORE DELETE ON core_event "
    "BEGIN SELECT RAISE(ABORT, 'core_event is append-only: DELETE refused'); END;",
]


def events_append_only_on_sqlite(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "sqlite":
        for statement in SQLITE_APPEND_ONLY:
            schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [
        ("core", "0011_tally_minute_index"),
    ]

    operations = [
        migrations.RunPython(migrations.RunPython.noop, events_append_only_on_sqlite),
        migrations.AlterField(
            model_name="event",
            name="tenant",
            field=models.ForeignKey(
                db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name="events", to="core.tenant"
            ),
        ),
        migrations.AlterField(
            model_name="lease",
            name="tenant",
            field=models.ForeignKey(
                db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name="leases", to="core.tenant"
            ),
        ),
        migrations.RunPython(events_append_only_on_sqlite, migrations.RunPython.noop),
    ]
