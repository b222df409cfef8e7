"""The notification outbox.

``outbox_enqueue`` writes a message in the caller's transaction (with the change that causes
it), so a notification exists if and only if the change committed. ``outbox_drain`` claims due
messages with ``FOR UPDATE SKIP LOCKED`` (drainers never block each other), delivers each
outside any transaction, and records the outcome with a compare-and-set on the claim.

A drainer that dies mid-way leaves its claim to expire; the message is then delivered again
*with the same key*, and receivers record a key once (``Notification`` is unique on it). So
a notification is recorded at most once per key, whatever crashes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from core import tracing
from core.celery import app
from core.models import Notification, OutboxMessage, OutboxStatus

logger = logging.getLogger(__name__)

CLAIM_SECONDS = 60
MAX_ATTEMPTS = 8

Deliverer = Callable[[OutboxMessage], None]


def deliver_in_app(message: OutboxMessage) -> None:
    """The in-app inbox: idempotent on the message key."""
    Notification.objects.get_or_create(
        key=message.key,
        defaults={"tenant_id": message.tenant_id, "kind": message.kind, "payload": message.payload},
    )


# Deliverers by message kind; other apps may register theirs (e.g. email, webhooks).
DELIVERERS: dict[str, Deliverer] = {}
DEFAULT_DELIVERER: Deliverer = deliver_in_app


def outbox_enqueue(
    *, tenant_id: int, key: str, kind: str, payload: dict[str, Any], traceparent: str = ""
) -> bool:
    """Add a message in the caller's transaction; False when ``key`` was enqueued before.

    The drainer is kicked when the transaction commits; beat drains too, so a lost kick only
    delays delivery. Its delivery's span is a child of the current span, else of
    ``traceparent`` (the run's trace, core.tracing).
    """
    _, created = OutboxMessage.objects.get_or_create(
        key=key,
        defaults={
            "tenant_id": tenant_id,
            "kind": kind,
            "payload": payload,
            "available_at": timezone.now(),
            "traceparent": tracing.current_traceparent() or traceparent,
        },
    )
    if created:
        transaction.on_commit(_kick)
    return created


# By name, as runs.queueing sends steps: core.tasks imports this module, not the other way.
DRAIN_TASK = "core.outbox_drain"


def _kick() -> None:
    try:
        app.send_task(DRAIN_TASK, queue="maintenance")
    except Exception:  # the broker is down: beat will drain it
        logger.warning("could not kick the outbox drainer; beat will", exc_info=True)


def _due(now: datetime) -> Q:
    return Q(status=OutboxStatus.PENDING, available_at__lte=now) | Q(
        status=OutboxStatus.SENDING, claimed_until__lt=now
    )


def outbox_claim(*, limit: int = 50, now: datetime | None = None) -> list[OutboxMessage]:
    """Claim up to ``limit`` due messages (pending, or sending with an expired claim)."""
    now = now or timezone.now()
    with transaction.atomic():
        ids = list(
            OutboxMessage.objects.select_for_update(skip_locked=True)
            .filter(_due(now))
            .order_by("id")
            .values_list("id", flat=True)[:limit]
        )
        OutboxMessage.objects.filter(id__in=ids).update(
            status=OutboxStatus.SENDING,
            claimed_until=now + timedelta(seconds=CLAIM_SECONDS),
            attempts=F("attempts") + 1,
            updated_at=now,
        )
    return list(OutboxMessage.objects.filter(id__in=ids).order_by("id"))


def outbox_deliver(message: OutboxMessage) -> bool:
    """Deliver one claimed message and record the outcome. False when it failed."""
    deliverer = DELIVERERS.get(message.kind, DEFAULT_DELIVERER)
    claim = Q(pk=message.pk, status=OutboxStatus.SENDING, attempts=message.attempts)
    attributes = {"runwarden.outbox.key": message.key, "runwarden.outbox.attempt": message.attempts}
    try:
        with tracing.span_in_run(message.traceparent, f"outbox {message.kind}", attributes):
            deliverer(message)  # an outgoing call carries the delivery's span on
    except Exception as exc:
        final = message.attempts >= MAX_ATTEMPTS
        backoff = min(600, 2**message.attempts) * random.uniform(0.5, 1.0)
        OutboxMessage.objects.filter(claim).update(
            status=OutboxStatus.FAILED if final else OutboxStatus.PENDING,
            available_at=timezone.now() + timedelta(seconds=backoff),
            last_error=f"{type(exc).__name__}: {exc}",
            updated_at=timezone.now(),
        )
        logger.warning("outbox message %s failed (attempt %s)", message.key, message.attempts, exc_info=True)
        return False
    OutboxMessage.objects.filter(claim).update(
        status=OutboxStatus.SENT, sent_at=timezone.now(), last_error="", updated_at=timezone.now()
    )
    return True


def outbox_drain(*, limit: int = 50) -> int:
    """Deliver what is due; returns how many were delivered."""
    return sum(outbox_deliver(message) for message in outbox_claim(limit=limit))
