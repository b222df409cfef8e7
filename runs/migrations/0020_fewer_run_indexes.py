"""Fewer index writes per status move: a run is in the finished-at, session and replay indexes
only when it has something to index (partial indexes), and a step's tenant has no index of its
own. The new indexes are built first and the old ones dropped last, so the table's reads wait
only for the drops' moment before the commit (its writes wait while each index builds). The
foreign keys' own indexes are dropped by name, their constraints left as they are (an
``AlterField`` would drop and re-add each constraint, checking every row again)."""

from django.db import migrations, models

# Django's names for the foreign keys' own indexes (the same on PostgreSQL and SQLite).
REPLAY_OF_INDEX = "runs_run_replay_of_id_7b879e88"
STEP_TENANT_INDEX = "runs_step_tenant_id_6cbd29aa"


class Migration(migrations.Migration):
    dependencies = [
        ("core", "0015_tenant_deadlock_policy"),
        ("runs", "0019_outside_effects"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=models.Q(("finished_at__isnull", False)),
                fields=["tenant", "finished_at"],
                name="run_finished_at",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=models.Q(("session_key", ""), _negated=True),
                fields=["tenant", "session_key", "id"],
                name="run_in_session",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=models.Q(("replay_of__isnull", False)), fields=["replay_of"], name="run_replays"
            ),
        ),
        migrations.RemoveIndex(model_name="run", name="run_tenant_session"),
        migrations.RemoveIndex(model_name="run", name="run_tenant_finished"),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="run",
                    name="replay_of",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=models.deletion.SET_NULL,
                        related_name="replays",
                        to="runs.run",
                    ),
                ),
                migrations.AlterField(
                    model_name="step",
                    name="tenant",
                    field=models.ForeignKey(
                        db_index=False, on_delete=models.deletion.PROTECT, related_name="+", to="core.tenant"
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    f"DROP INDEX IF EXISTS {REPLAY_OF_INDEX}",
                    reverse_sql=f"CREATE INDEX {REPLAY_OF_INDEX} ON runs_run (replay_of_id)",
                ),
                migrations.RunSQL(
                    f"DROP INDEX IF EXISTS {STEP_TENANT_INDEX}",
                    reverse_sql=f"CREATE INDEX {STEP_TENANT_INDEX} ON runs_step (tenant_id)",
                ),
            ],
        ),
    ]
