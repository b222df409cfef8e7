from __future__ import annotations

import re

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings

from core import services
from core.asgi import application
from core.models import Tenant, User
from tests.conftest import client_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://127.0.0.1")


def session_headers(user: User) -> list[tuple[bytes, bytes]]:
    client = client_for(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return [ORIGIN, (b"cookie", cookie), (b"host", b"127.0.0.1")]


async def closed_for_reconnect(communicator: WebsocketCommunicator) -> bool:
    """Whether the socket is closed with 1012 (reconnect) before it sends anything else than
    pushes of events."""
    for _ in range(20):
        output = await communicator.receive_output(timeout=5)
        if output["type"] != "websocket.send":
            return output == {"type": "websocket.close", "code": 1012}
    return False


async def test_the_layer_is_the_real_redis_one() -> None:
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"


async def test_an_anonymous_socket_is_refused() -> None:
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=[ORIGIN, (b"host", b"127.0.0.1")])
    connected, code = await communicator.connect()
    assert not connected
    assert code == 4401


async def test_a_foreign_origin_is_refused(acme_operator: User) -> None:
    headers = await sync_to_async(session_headers)(acme_operator)
    headers[0] = (b"origin", b"http://evil.example")
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, _ = await communicator.connect()
    assert not connected


async def test_a_member_gets_pushes_of_their_tenant_only(
    acme: Tenant, globex: Tenant, acme_operator: User
) -> None:
    headers = await sync_to_async(session_headers)(acme_operator)
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    try:
        # The fixtures' own acme events (its connections) may still be on their way: a marker
        # event comes after them all, so once it arrives nothing of acme is pending.
        marker = await sync_to_async(services.event_record)(
            tenant=acme, subject="run:marker", verb="created", actor="t"
        )
        for _ in range(20):
            if f'data-event-id="{marker.pk}"' in await communicator.receive_from(timeout=5):
                break
        await sync_to_async(services.event_record)(tenant=globex, subject="run:g", verb="created", actor="t")
        assert await communicator.receive_nothing(timeout=0.5)
        event = await sync_to_async(services.event_record)(
            tenant=acme, subject="run:a", verb="created", actor="t"
        )
        message = await communicator.receive_from(timeout=5)
        assert f'data-event-id="{event.pk}"' in message
        assert 'hx-swap-oob="true"' in message
    finally:
        await communicator.disconnect()


async def test_revoking_a_membership_closes_that_members_socket(
    acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    headers = await sync_to_async(session_headers)(acme_operator)
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    revoked = await sync_to_async(services.membership_revoke)(
        tenant=acme, user=acme_operator, actor=acme_admin
    )
    assert revoked
    # Pushes of earlier events (the fixtures', the revoke's own audit event) may arrive first;
    # the socket must then be closed.
    assert await closed_for_reconnect(communicator)


async def test_changing_a_members_role_closes_their_socket_so_it_reconnects_with_the_new_role(
    acme: Tenant, acme_operator: User, acme_admin: User
) -> None:
    headers = await sync_to_async(session_headers)(acme_operator)
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    await sync_to_async(services.membership_set_role)(
        tenant=acme, actor=acme_admin, user=acme_operator, role="reviewer"
    )
    assert await closed_for_reconnect(communicator)


async def test_a_burst_of_pushes_arrives_whole_and_in_order_in_fewer_layer_messages(
    acme: Tenant, acme_operator: User
) -> None:
    """A busy worker records an event per step: pushes within one interval share one layer
    message (live.batch), and the socket still gets every event, in order."""
    headers = await sync_to_async(session_headers)(acme_operator)
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    layer = get_channel_layer()
    sends: list[dict[str, object]] = []
    group_send = layer.group_send

    async def counted(group: str, message: dict[str, object]) -> None:
        sends.append(message)
        await group_send(group, message)

    layer.group_send = counted  # observed, not replaced: the real Redis layer delivers
    try:

        def burst() -> list[int]:
            return [
                services.event_record(tenant=acme, subject=f"run:burst-{n}", verb="created", actor="t").pk
                for n in range(30)
            ]

        ids = await sync_to_async(burst)()
        received: list[int] = []
        while len(received) < len(ids):
            frame = await communicator.receive_from(timeout=5)  # a batch's events come in one frame
            for event_id in map(int, re.findall(r'data-event-id="(\d+)"', frame)):
                if event_id in ids:  # not a late push of the fixtures' own events
                    received.append(event_id)
        assert received == ids
        burst_sends = [m for m in sends if m["type"] == "live.batch" or m.get("event_id") in ids]
        assert 1 <= len(burst_sends) < len(ids)
        assert any(message["type"] == "live.batch" for message in sends)
    finally:
        del layer.group_send
        await communicator.disconnect()
