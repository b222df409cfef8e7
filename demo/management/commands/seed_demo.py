from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from demo.seeding import seed_demo_tenants_and_users


class Command(BaseCommand):
    help = "Create the demo tenants (acme, globex) and users; safe to run again."

    def handle(self, *args: Any, **options: Any) -> None:
        rows = seed_demo_tenants_and_users()
        self.stdout.write("Demo logins (password from DEMO_PASSWORD, default 'runwarden'):")
        for username, tenant, role in rows:
            self.stdout.write(f"  {username:16} {role:9} in {tenant}")
        if settings.DEMO_PASSWORD == "runwarden":
            self.stdout.write("  password: runwarden")
