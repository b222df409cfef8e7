"""The demo's invariant: its sandbox provider records every call, so it can tell what the
engine cannot — whether an effect reached the outside world twice."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Count

from demo.models import SandboxCall


def provider_saw_a_key_twice(now: datetime) -> list[str]:
    """No effect happened twice: the sandbox provider saw each idempotency key at most once."""
    doubled = (
        SandboxCall.objects.filter(ok=True)
        .exclude(idempotency_key="")
        .values("idempotency_key")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    return [
        f"idempotency key {row['idempotency_key']} reached the provider {row['n']} times" for row in doubled
    ]
