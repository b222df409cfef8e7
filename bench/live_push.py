"""The push bench's Django side: consoles' login sessions, and what the sockets should have got.

The sockets themselves live in their own process (bench/push_clients.py); here is what needs
the database: users logged in as a browser would be, and the events each tenant committed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.db.models import Count, Max
from django.test import Client

from core.models import Event, Membership, Role, Tenant, User

CONSOLE_USER_PREFIX = "bench-console-"


def console_sessions(tenants: Sequence[Tenant], count: int) -> list[tuple[str, int]]:
    """``count`` operators, one per console, spread over ``tenants`` in turn (socket n is a member
    of ``tenants[n % len(tenants)]`` only), each logged in as Django's login does it (a session
    row, the session cookie): (cookie header, tenant id) per console."""
    sessions = []
    for number in range(count):
        tenant = tenants[number % len(tenants)]
        user, _ = User.objects.get_or_create(username=f"{CONSOLE_USER_PREFIX}{number}")
        Membership.objects.filter(user=user).exclude(tenant=tenant).delete()
        Membership.objects.update_or_create(user=user, tenant=tenant, defaults={"role": Role.OPERATOR})
        browser = Client()
        browser.force_login(user)
        cookie = browser.cookies[settings.SESSION_COOKIE_NAME].value
        sessions.append((f"{settings.SESSION_COOKIE_NAME}={cookie}", tenant.pk))
    return sessions


def last_event_id() -> int:
    return int(Event.objects.aggregate(last=Max("id"))["last"] or 0)


def events_by_tenant(after_id: int, upto_id: int) -> Counter[int]:
    """How many events each tenant committed with ``after_id < id <= upto_id``."""
    rows = (
        Event.objects.filter(id__gt=after_id, id__lte=upto_id)
        .values("tenant_id")
        .annotate(n=Count("id"))
        .values_list("tenant_id", "n")
    )
    return Counter(dict(rows))


def all_delivered(report: dict[str, Any], expected: Counter[int]) -> bool:
    return all(s["received"] >= expected[s["tenant_id"]] for s in report["sockets"])


def delivery_check(report: dict[str, Any], expected: Counter[int]) -> dict[str, int]:
    """Per window, in the sockets' report: pushes of another tenant (must be 0, and the sockets of
    a tenant that committed nothing must have received nothing), pushes a socket of the event's
    tenant never got (the layer delivers at most once: 0 expected, not guaranteed), and sockets
    that closed."""
    sockets = report["sockets"]
    return {
        "foreign": sum(s["foreign"] for s in sockets),
        "quiet_sockets": sum(1 for s in sockets if not expected[s["tenant_id"]]),
        "quiet_sockets_received": sum(s["received"] for s in sockets if not expected[s["tenant_id"]]),
        "missed": sum(max(expected[s["tenant_id"]] - s["received"], 0) for s in sockets),
        "closed": sum(1 for s in sockets if s["closed"]),
    }
