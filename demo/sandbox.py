"""Sandbox connectors: honest stand-ins for a CRM, a messaging service and a payment provider.

Each call sleeps for the configured latency, fails at the configured rate, and is recorded in
``SandboxCall`` with its start and finish times. ``RUNWARDEN_SANDBOX_LATENCY_MS`` and
``RUNWARDEN_SANDBOX_FAILURE_RATE`` tune them (settings or environment).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from core.connections import BoundConnection
from demo.models import SandboxCall, SandboxContact, SandboxInvoice, SandboxLead


class SandboxUnavailable(ConnectionError):
    """The sandbox service failed this call (injected failure)."""


class SandboxVersionMismatch(Exception):
    """The CRM record changed since it was read."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"contact version is {actual}, the write expected {expected}")
        self.expected = expected
        self.actual = actual


async def model_draft_followup(*, name: str) -> str:
    """A stand-in for a model API (an async client's completion): it answers after the sandbox
    latency, records nothing (a model call changes nothing in the world) and always writes the
    same note."""
    await asyncio.sleep(settings.RUNWARDEN_SANDBOX_LATENCY_MS / 1000)
    return f"Hi {name},\n\nThanks for your interest. Shall we set up a call this week?\n\nBest,\nAcme"


def _latency_and_failure() -> tuple[Any, bool]:
    """Wait the configured latency; return when the call started and whether it fails."""
    started = timezone.now()
    time.sleep(settings.RUNWARDEN_SANDBOX_LATENCY_MS / 1000)
    return started, random.random() < settings.RUNWARDEN_SANDBOX_FAILURE_RATE


class SandboxRefused(PermissionError):
    """The sandbox refused a connection that is not an account of the calling tenant (as a real
    provider refuses another customer's credentials)."""


def _record(
    *,
    tenant_id: int,
    connector: str,
    operation: str,
    target: str,
    request: dict[str, Any],
    response: Any,
    key: str,
    ok: bool,
    started: Any,
    connection: BoundConnection | None,
) -> None:
    SandboxCall.objects.create(
        tenant_id=tenant_id,
        connector=connector,
        operation=operation,
        target=target,
        request=request,
        response=response,
        idempotency_key=key,
        ok=ok,
        started_at=started,
        finished_at=timezone.now(),
        connection_id=connection.id if connection else None,
        environment=connection.environment if connection else "",
        run_id=connection.run_id if connection else "",
    )


def _perform(
    tenant_id: int,
    connector: str,
    operation: str,
    target: str,
    request: dict[str, Any],
    key: str,
    act: Any,
    connection: BoundConnection | None = None,
) -> Any:
    """Call the fake provider as ``connection`` (the account a run bound; None for a direct
    call), and record the call with the account it went to."""
    if connection is not None and (connection.tenant_id != tenant_id or connection.provider != connector):
        raise SandboxRefused(f"{connector}: connection {connection.label} is not an account of this tenant")
    started, failed = _latency_and_failure()
    call = {"tenant_id": tenant_id, "connector": connector, "operation": operation, "target": target,
            "request": request, "key": key, "started": started, "connection": connection}  # fmt: skip
    if failed:
        _record(response=None, ok=False, **call)
        raise SandboxUnavailable(f"{connector}.{operation} is unavailable (injected failure)")
    response = act()
    _record(response=response, ok=True, **call)
    return response


def crm_get_contact(
    *, tenant_id: int, contact_id: int, connection: BoundConnection | None = None
) -> dict[str, Any]:
    def act() -> dict[str, Any]:
        contact = SandboxContact.objects.get(tenant_id=tenant_id, number=contact_id)
        return {
            "id": contact.number,
            "name": contact.name,
            "email": contact.email,
            "stage": contact.stage,
            "version": contact.version,
        }

    return dict(_perform(tenant_id, "crm", "get_contact", f"contact:{contact_id}", {}, "", act, connection))


def crm_update_contact(
    *,
    tenant_id: int,
    contact_id: int,
    changes: dict[str, Any],
    expected_version: int | None,
    key: str = "",
    connection: BoundConnection | None = None,
) -> dict[str, Any]:
    """Write ``changes`` if the contact is still at ``expected_version`` (like an ETag); None:
    whatever version it is at (a PATCH without If-Match)."""
    allowed = {"stage", "name", "email"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"unknown contact fields: {', '.join(sorted(unknown))}")

    def act() -> dict[str, Any]:
        current = SandboxContact.objects.filter(tenant_id=tenant_id, number=contact_id)
        if expected_version is not None:
            current = current.filter(version=expected_version)
        updated = current.update(**changes, version=F("version") + 1, updated_at=timezone.now())
        contact = SandboxContact.objects.get(tenant_id=tenant_id, number=contact_id)
        if updated != 1 and expected_version is not None:
            raise SandboxVersionMismatch(expected_version, contact.version)
        return {"id": contact.number, "stage": contact.stage, "version": contact.version}

    request = {"changes": changes, "expected_version": expected_version}
    return dict(
        _perform(tenant_id, "crm", "update_contact", f"contact:{contact_id}", request, key, act, connection)
    )


def lead_get(*, tenant_id: int, lead_id: int, connection: BoundConnection | None = None) -> dict[str, Any]:
    def act() -> dict[str, Any]:
        lead = SandboxLead.objects.get(tenant_id=tenant_id, number=lead_id)
        return {"id": lead.number, "name": lead.name, "company": lead.company, "score": lead.score}

    return dict(_perform(tenant_id, "crm", "get_lead", f"lead:{lead_id}", {}, "", act, connection))


def messaging_send(
    *,
    tenant_id: int,
    to: str,
    subject: str,
    body: str,
    key: str = "",
    connection: BoundConnection | None = None,
) -> dict[str, Any]:
    request = {"to": to, "subject": subject, "body": body}
    return dict(
        _perform(
            tenant_id,
            "messaging",
            "send",
            to,
            request,
            key,
            lambda: {"message_id": f"msg_{uuid.uuid4().hex[:12]}"},
            connection,
        )
    )


def payments_charge(
    *,
    tenant_id: int,
    invoice_id: int,
    amount: Decimal,
    key: str = "",
    connection: BoundConnection | None = None,
) -> dict[str, Any]:
    def act() -> dict[str, Any]:
        SandboxInvoice.objects.filter(tenant_id=tenant_id, number=invoice_id).update(
            amount_paid=F("amount_paid") + amount
        )
        return {"payment_id": f"pay_{uuid.uuid4().hex[:12]}", "amount": str(amount)}

    request = {"amount": str(amount)}
    return dict(
        _perform(tenant_id, "payments", "charge", f"invoice:{invoice_id}", request, key, act, connection)
    )


def payments_refund(
    *, tenant_id: int, payment_id: str, amount: str, key: str = "", connection: BoundConnection | None = None
) -> dict[str, Any]:
    def act() -> dict[str, Any]:
        return {"refund_id": f"ref_{uuid.uuid4().hex[:12]}", "payment_id": payment_id, "amount": amount}

    request = {"payment_id": payment_id, "amount": amount}
    return dict(
        _perform(tenant_id, "payments", "refund", f"payment:{payment_id}", request, key, act, connection)
    )


def inventory_reserve(
    *, tenant_id: int, sku: str, quantity: int, key: str = "", connection: BoundConnection | None = None
) -> dict[str, Any]:
    def act() -> dict[str, Any]:
        return {"reservation_id": f"res_{uuid.uuid4().hex[:12]}", "sku": sku, "quantity": quantity}

    request = {"sku": sku, "quantity": quantity}
    return dict(_perform(tenant_id, "inventory", "reserve", f"sku:{sku}", request, key, act, connection))


def inventory_release(
    *, tenant_id: int, reservation_id: str, key: str = "", connection: BoundConnection | None = None
) -> dict[str, Any]:
    def act() -> dict[str, Any]:
        return {"released": reservation_id}

    request = {"reservation_id": reservation_id}
    target = f"reservation:{reservation_id}"
    return dict(_perform(tenant_id, "inventory", "release", target, request, key, act, connection))


def seed_sandbox(tenant_id: int, count: int = 20) -> None:
    """Contacts, leads and invoices 1..count for a tenant (idempotent)."""
    for n in range(1, count + 1):
        SandboxContact.objects.get_or_create(
            tenant_id=tenant_id,
            number=n,
            defaults={"name": f"Contact {n}", "email": f"contact{n}@example.com"},
        )
        SandboxLead.objects.get_or_create(
            tenant_id=tenant_id,
            number=n,
            defaults={"name": f"Lead {n}", "company": f"Company {n}", "score": n * 5},
        )
        SandboxInvoice.objects.get_or_create(
            tenant_id=tenant_id,
            number=n,
            defaults={"customer": f"Customer {n}", "amount_due": Decimal(100 + n * 10)},
        )


def crm_edit_by_hand(*, tenant_id: int, contact_id: int, name: str) -> None:
    """Someone edits a contact in the CRM directly, outside Runwarden (the demo's contention
    scenario): its version moves on, so a run that read the old one finds out when it writes."""
    from django.db.models import F

    SandboxContact.objects.filter(tenant_id=tenant_id, number=contact_id).update(
        name=name, version=F("version") + 1
    )
