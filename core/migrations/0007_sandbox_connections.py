"""Give every existing tenant a default sandbox connection per demo provider in production and
staging, so the demo workflows (which now bind their connections at start) keep running."""

from __future__ import annotations

from typing import Any

from django.db import migrations

PROVIDERS = ("crm", "messaging", "payments", "inventory")
ENVIRONMENTS = ("production", "staging")


def create(apps: Any, schema_editor: Any) -> None:
    tenant_model = apps.get_model("core", "Tenant")
    connection_model = apps.get_model("core", "Connection")
    for tenant in tenant_model.objects.all():
        for environment in ENVIRONMENTS:
            for provider in PROVIDERS:
                if not connection_model.objects.filter(
                    tenant=tenant, environment=environment, provider=provider, is_default=True
                ).exists():
                    connection_model.objects.get_or_create(
                        tenant=tenant,
                        environment=environment,
                        provider=provider,
                        name=f"sandbox-{provider}",
                        defaults={"is_default": True, "config": {"sandbox": True}, "created_by": "migration"},
                    )


class Migration(migrations.Migration):
    dependencies = [("core", "0006_environments_connections")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
