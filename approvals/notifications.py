"""Notifications of what waits for people: a new approval request, an escalation; and, for an
agent outside Runwarden waiting on a person, the decision (``approval_decided``).

Each is an outbox message written in the transaction that opened the request (so it exists
exactly when the request does), keyed by request and version. The drainer delivers it:

- in-app: a ``Notification`` row (unique on the key: recorded once however often it is
  delivered), listed in the approvals inbox; the nav's inbox badge counts pending requests;
- to the tenant's webhook, if it has one: the default ``webhook`` connection of its production
  environment (``config.url``, and its secret signs the body). A POST of JSON with
  ``Runwarden-Delivery: <key>`` and ``Runwarden-Signature: sha256=<hmac of the body>``; any
  answer but 2xx (or no answer in 5 s) is retried with backoff by the outbox, so receivers
  should record a delivery key once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from typing import Any

from core import tracing
from core.connections import decrypt_secret
from core.models import Connection, OutboxMessage
from core.outbox import deliver_in_app, outbox_enqueue

KINDS = ("approval_requested", "approval_escalated", "approval_decided")
WEBHOOK_PROVIDER = "webhook"
WEBHOOK_TIMEOUT_SECONDS = 5


class WebhookRefused(Exception):
    """The receiver answered something other than 2xx: the outbox retries."""


def notify(request: Any, kind: str) -> None:
    """Enqueue ``kind`` about an ApprovalRequest, in the caller's transaction."""
    outbox_enqueue(
        tenant_id=request.tenant_id,
        key=f"{kind}:{request.pk}:{request.version}",
        kind=kind,
        payload={
            "approval_id": request.pk,
            "status": request.status,
            "run_id": request.run_id,
            "step_id": request.step_id,
            "eligible_roles": ["admin"] if request.escalated else list(request.eligible_roles),
            "required": request.required,
            "expires_at": request.expires_at.isoformat() if request.expires_at else None,
        },
        traceparent=request.run.traceparent if tracing.enabled() else "",
    )


def webhook_for(tenant_id: int) -> Connection | None:
    return (
        Connection.objects.filter(
            tenant_id=tenant_id,
            provider=WEBHOOK_PROVIDER,
            environment="production",
            is_default=True,
            archived_at__isnull=True,
        )
        .order_by("pk")
        .first()
    )


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(message: OutboxMessage) -> None:
    """In-app first (idempotent on the key), then the tenant's webhook, if any."""
    deliver_in_app(message)
    hook = webhook_for(message.tenant_id)
    url = str((hook.config or {}).get("url", "")) if hook else ""
    if hook is None or not url.startswith(("https://", "http://")):
        return
    body = json.dumps({"key": message.key, "kind": message.kind, **message.payload}, sort_keys=True).encode()
    secret = decrypt_secret(hook.secret_encrypted) if hook.secret_encrypted else ""
    post = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Runwarden-Delivery": message.key,
            "Runwarden-Signature": signature(secret, body),
            **tracing.outgoing_headers(),  # the receiver's spans join the run's trace
        },
    )
    try:
        with urllib.request.urlopen(post, timeout=WEBHOOK_TIMEOUT_SECONDS) as answer:  # noqa: S310 (http(s) only)
            status = answer.status
    except urllib.error.HTTPError as refused:
        status = refused.code
    if not 200 <= status < 300:
        raise WebhookRefused(f"{url} answered {status}")
