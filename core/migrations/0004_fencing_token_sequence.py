"""Fencing tokens come from a database sequence (a one-row counter on SQLite)."""

from django.db import migrations


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("CREATE SEQUENCE IF NOT EXISTS core_fencing_token_seq AS bigint START 1", params=None)
    else:
        apps.get_model("core", "FencingCounter").objects.get_or_create(id=1, defaults={"value": 0})


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP SEQUENCE IF EXISTS core_fencing_token_seq", params=None)


class Migration(migrations.Migration):
    dependencies = [("core", "0003_coordination")]
    operations = [migrations.RunPython(forward, backward)]
