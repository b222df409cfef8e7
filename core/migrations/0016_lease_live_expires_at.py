from __future__ import annotations

from django.db import migrations, models

INDEX = models.Index(
    fields=["expires_at"], name="lease_live_expires_at", condition=models.Q(released_at__isnull=True)
)


def swap_indexes(apps, schema_editor):
    """On PostgreSQL, built and dropped CONCURRENTLY: core_lease takes writes all the time, and
    a plain CREATE INDEX would hold them back for the whole build."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS lease_live_expires_at ON core_lease (expires_at)"
            " WHERE released_at IS NULL"
        )
        schema_editor.execute("DROP INDEX CONCURRENTLY IF EXISTS lease_expires_at")
        return
    lease = apps.get_model("core", "Lease")
    schema_editor.execute("DROP INDEX IF EXISTS lease_expires_at")
    schema_editor.add_index(lease, INDEX)


def restore_index(apps, schema_editor):
    concurrently = " CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(
        f"CREATE INDEX{concurrently} IF NOT EXISTS lease_expires_at ON core_lease (expires_at)"
    )
    schema_editor.execute(f"DROP INDEX{concurrently} IF EXISTS lease_live_expires_at")


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("core", "0015_tenant_deadlock_policy"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RemoveIndex(model_name="lease", name="lease_expires_at"),
                migrations.AddIndex(model_name="lease", index=INDEX),
            ],
            database_operations=[migrations.RunPython(swap_indexes, restore_index)],
        ),
    ]
