# ruff: noqa: E501
"""Notifications: a new approval request (or an escalation) is an outbox message written with
it, delivered in-app once per key and to the tenant's signed webhook, retried until it answers
2xx; the nav badge counts pending requests; another tenant sees none of it."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from core.connections import connection_add
from core.models import Notification, OutboxMessage, OutboxStatus, Tenant, User
from core.outbox import outbox_drain
from runs.services import run_start
from tests.approvals.helpers import pending_request, pump
from tests.conftest import client_for


class Receiver:
    """A webhook receiver on loopback that answers the statuses it is given, in order."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append({"headers": dict(self.headers), "body": body})
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                """Quiet: http.server would print every request to stderr."""

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/runwarden"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver([500])  # the first delivery fails: the outbox must retry it
    yield running
    running.server.shutdown()


def gated_run(tenant: Tenant) -> Any:
    run = run_start(
        tenant=tenant, workflow="demo.lead_followup", input={"lead_id": 2, "contact_id": 2}, actor="bot"
    ).run
    pump()
    return pending_request(run)


def test_a_new_request_reaches_the_inbox_once_and_the_webhook_signed_after_a_retry(
    sandbox_acme: Tenant, acme_operator: User, receiver: Receiver
) -> None:
    connection_add(
        tenant=sandbox_acme,
        environment="production",
        provider="webhook",
        name="ops-hook",
        actor="admin",
        is_default=True,
        secret="hook-secret",
        config={"url": receiver.url},
    )
    request = gated_run(sandbox_acme)
    message = OutboxMessage.objects.get(kind="approval_requested")
    assert message.key == f"approval_requested:{request.pk}:{request.version}"
    assert outbox_drain() == 0, "the receiver answered 500: not delivered"
    message.refresh_from_db()
    assert message.status == OutboxStatus.PENDING and message.attempts == 1
    OutboxMessage.objects.filter(pk=message.pk).update(available_at=message.created_at)  # its backoff is over
    assert outbox_drain() == 1
    assert len(receiver.received) == 2, "retried once"
    delivery = receiver.received[-1]
    body = delivery["body"]
    expected = "sha256=" + hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
    assert delivery["headers"]["Runwarden-Signature"] == expected
    assert delivery["headers"]["Runwarden-Delivery"] == message.key
    assert json.loads(body)["approval_id"] == request.pk
    # In-app: recorded once, though the message was delivered (in-app) twice.
    assert Notification.objects.filter(key=message.key).count() == 1
    assert outbox_drain() == 0, "nothing is due any more"


def test_the_badge_and_the_inbox_list_are_the_tenants_own(
    sandbox_acme: Tenant, globex: Tenant, acme_operator: User, globex_operator: User
) -> None:
    gated_run(sandbox_acme)
    outbox_drain()
    acme_client, globex_client = client_for(acme_operator), client_for(globex_operator)
    assert b'aria-label="1 pending approvals">1<' in acme_client.get("/approvals/badge/").content
    assert b'aria-label="0 pending approvals">0<' in globex_client.get("/approvals/badge/").content
    assert b'id="notifications"' in acme_client.get("/approvals/").content
    assert b'id="notifications"' not in globex_client.get("/approvals/").content
    assert b'id="inbox-badge"' in acme_client.get("/runs/").content, "every page has the badge"


def test_a_notification_shows_its_requests_state_now_not_as_it_was_sent(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User
) -> None:
    """The reviewer reads the inbox after the operator approved one of two requests."""
    from approvals import services
    from approvals.selectors import notifications_for_user

    decided, waiting = gated_run(sandbox_acme), gated_run(sandbox_acme)
    outbox_drain()
    services.approval_decide(request=decided, user=acme_operator, decision="approve", expected_version=1)
    lines = {line.payload["approval_id"]: line for line in notifications_for_user(acme_reviewer)}
    assert (lines[decided.pk].approval_status, lines[decided.pk].approval_state) == (
        "approved",
        "approved by operator",
    )
    assert (lines[waiting.pk].approval_status, lines[waiting.pk].approval_state) == (
        "pending",
        "waiting for a decision",
    )
    body = client_for(acme_reviewer).get("/approvals/").content.decode()
    notes = body[body.index('id="notifications"') :]
    assert (
        f'#{decided.pk}</a> of <a class="mono" href="/runs/{decided.run_id}/">{decided.run_id}</a>: '
        '<span class="badge status-approved" title="approved">approved by operator</span>'
    ) in notes
    assert '<span title="approval_requested">requested</span> at' in notes
    assert '<span class="badge status-pending" title="pending">waiting for a decision</span>' in notes
