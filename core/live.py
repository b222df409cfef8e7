"""Live push: committed events go to the Channels group of their tenant.

The channel layer delivers at most once, so a push is a hint that carries the event id;
pages re-fetch their fragments when they notice a gap or a reconnect.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from core.models import Event

logger = logging.getLogger(__name__)


def tenant_group(tenant_id: int) -> str:
    return f"tenant_{tenant_id}"


def user_group(user_id: int) -> str:
    return f"user_{user_id}"


def group_send(group: str, message: dict[str, object]) -> None:
    """Send to a Channels group; a failing layer is logged, never raised (pushes are hints)."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:
        logger.warning("live push to %s failed", group, exc_info=True)


def publish_event(event: Event) -> None:
    group_send(
        tenant_group(event.tenant_id),
        {
            "type": "event.push",
            "event_id": event.pk,
            "tenant_id": event.tenant_id,
            "subject": event.subject,
            "verb": event.verb,
        },
    )
