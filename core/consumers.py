from __future__ import annotations

from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import get_template

from core import live
from core.models import Membership

LIVE_EVENT_TMPL = get_template("core/_live_event.html")


@database_sync_to_async
def _fetch_tenant_ids(user_id: int) -> list[int]:
    return list(Membership.objects.filter(user_id=user_id).values_list("tenant_id", flat=True))


class LiveConsumer(AsyncWebsocketConsumer):
    """One socket per browser tab, joined to the groups of the user's tenants only.

    Messages are htmx out-of-band fragments; each carries the event id so a page can tell
    it missed one.
    """

    groups_joined: list[str]

    async def connect(self) -> None:
        user = self.scope.get("user")
        self.groups_joined = []
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        for tenant_id in await _fetch_tenant_ids(user.pk):
            self.groups_joined.append(live.tenant_group(tenant_id))
        self.groups_joined.append(live.user_group(user.pk))
        for group in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def event_push(self, message: dict[str, Any]) -> None:
        await self.send(text_data=LIVE_EVENT_TMPL.render({"event": message}))

    async def live_batch(self, message: dict[str, Any]) -> None:
        """Pushes that came within one interval (core.live.PUSH_INTERVAL_SECONDS), in order."""
        for each in message["messages"]:
            handler = getattr(self, get_handler_name(each), None)
            if handler is not None:
                await handler(each)

    async def membership_changed(self, message: dict[str, Any]) -> None:
        """The user's role in a tenant was added, changed or removed: close, so that nothing of
        a tenant they left is pushed here and the browser reconnects with the groups (and the
        role) they hold now."""
        await self.close(code=1012)  # "service restart": the browser reconnects
