from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from core import services
from core.asgi import application
from core.models import Tenant, User

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://127.0.0.1")


def session_headers(user: User) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return [ORIGIN, (b"cookie", cookie), (b"host", b"127.0.0.1")]


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
    # The revoke's own audit event may arrive first; the socket must then be closed.
    outputs = [await communicator.receive_output(timeout=5) for _ in range(2)]
    assert {"type": "websocket.close", "code": 1012} in outputs


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
    outputs = [await communicator.receive_output(timeout=5) for _ in range(2)]
    assert {"type": "websocket.close", "code": 1012} in outputs
