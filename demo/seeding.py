"""Demo tenants and users, created idempotently by ``manage.py seed_demo``."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from core.connections import BUILTIN_ENVIRONMENTS, connection_add
from core.models import Connection, Membership, Role, Tenant, TenantQuota, User
from demo.sandbox import seed_sandbox  # the demo's outside world (contacts, leads, invoices)

DEMO_TENANTS = {"acme": "Acme Corp", "globex": "Globex Corporation"}
DEMO_USERS = [
    ("operator", "acme", Role.OPERATOR),
    ("reviewer", "acme", Role.REVIEWER),
    ("admin", "acme", Role.ADMIN),
    ("globex-operator", "globex", Role.OPERATOR),
]


@transaction.atomic
def seed_demo_tenants_and_users(password: str | None = None) -> list[tuple[str, str, str]]:
    """Create (or reset) the demo tenants and users. Returns (username, tenant, role) rows."""
    password = password or settings.DEMO_PASSWORD
    tenants = {}
    for slug, name in DEMO_TENANTS.items():
        tenants[slug], _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": name})
        TenantQuota.objects.get_or_create(tenant=tenants[slug])
    for username, slug, role in DEMO_USERS:
        user, _ = User.objects.get_or_create(username=username, defaults={"email": f"{username}@example.com"})
        user.set_password(password)
        # Tenant admins manage their tenant in the console; Django's admin site is for the
        # platform's own staff (``manage.py createsuperuser``), never a tenant's admin.
        user.is_staff = user.is_superuser = False
        user.save(update_fields=["password", "is_staff", "is_superuser"])
        Membership.objects.update_or_create(user=user, tenant=tenants[slug], defaults={"role": role})
    for tenant in tenants.values():
        seed_sandbox(tenant.pk)
        sandbox_connections_create(tenant, actor="seed_demo")
    return [(u, t, r.value) for u, t, r in DEMO_USERS]


def sandbox_connections_create(tenant: Tenant, *, actor: str = "system") -> None:
    """Give a tenant a default sandbox connection per demo provider in each built-in
    environment (the demo's, and the tests'), unless it already has one."""
    for environment in BUILTIN_ENVIRONMENTS:
        for provider in ("crm", "messaging", "payments", "inventory"):
            exists = Connection.objects.filter(
                tenant=tenant, environment=environment, provider=provider, is_default=True
            ).exists()
            if not exists:
                connection_add(
                    tenant=tenant,
                    environment=environment,
                    provider=provider,
                    name=f"sandbox-{provider}",
                    actor=actor,
                    is_default=True,
                    config={"sandbox": True},
                )
