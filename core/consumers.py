from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import lru_cache
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.template.loader import get_template

from core import live
from core.models import Membership

logger = logging.getLogger(__name__)

LIVE_EVENT_TMPL = get_template("core/_live_event.html")

# The layer forgets a group's member after its group_expiry (a day by default): the fan-out
# joins its groups again well before that, idle or not.
REJOIN_SECONDS = 3600.0


def _fragment(push: dict[str, Any]) -> str:
    return _event_fragment(
        push["event_id"], push["tenant_id"], push["subject"], push["verb"], push.get("committed_at", "")
    )


@lru_cache(maxsize=1024)
def _event_fragment(event_id: int, tenant_id: int, subject: str, verb: str, committed_at: str) -> str:
    """Every socket of a tenant gets the same push: rendered once per process, not per socket."""
    event = {
        "event_id": event_id,
        "tenant_id": tenant_id,
        "subject": subject,
        "verb": verb,
        "committed_at": committed_at,
    }
    return LIVE_EVENT_TMPL.render({"event": event})


@database_sync_to_async
def _fetch_tenant_ids(user_id: int) -> list[int]:
    return list(Membership.objects.filter(user_id=user_id).values_list("tenant_id", flat=True))


class _ProcessFanout:
    """The live pushes' one receiving channel in a web process (per event loop), joined to the
    groups its sockets need, handing each push to the process's sockets of that group.

    A layer channel per socket made every push wake every socket's receive (channels-redis
    hands the lock and the message around each of them, a few tasks each, per push): at 500
    sockets that alone took the process more than a core. Here a push costs one receive and
    one send per socket. Pushes carry their group (core.live stamps it); the fan-out stops
    with its last socket."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.loop = asyncio.get_running_loop()
        self.channel_name = ""
        self.members: dict[str, set[LiveConsumer]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    async def join(self, consumer: LiveConsumer, groups: list[str]) -> None:
        async with self.lock:
            if self.reader is None:
                self.channel_name = await self.layer.new_channel("live.")
                self.reader = asyncio.create_task(self._read())
            for group in groups:
                if group not in self.members:
                    self.members[group] = set()
                    await self.layer.group_add(group, self.channel_name)
                self.members[group].add(consumer)

    async def leave(self, consumer: LiveConsumer, groups: list[str]) -> None:
        async with self.lock:
            for group in groups:
                members = self.members.get(group)
                if members is None:
                    continue
                members.discard(consumer)
                if not members:
                    del self.members[group]
                    await self.layer.group_discard(group, self.channel_name)
            if not self.members and self.reader is not None:
                self.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.reader
                self.reader = None

    async def _read(self) -> None:
        try:
            await self._deliver()
        except Exception:
            # The layer failed (Redis down): close the sockets as their own receive used to
            # fail them, so browsers show they are not live, reconnect, and re-fetch what they
            # missed; the next connect starts a new fan-out.
            logger.warning("live pushes: the channel layer failed; closing the sockets", exc_info=True)
            sockets = {consumer for members in self.members.values() for consumer in members}
            self.members, self.reader = {}, None
            for consumer in sockets:
                with contextlib.suppress(Exception):
                    await consumer.close(code=1012)  # "service restart": the browser reconnects

    async def _deliver(self) -> None:
        joined_at = self.loop.time()
        while True:
            try:
                message = await asyncio.wait_for(self.layer.receive(self.channel_name), REJOIN_SECONDS)
            except TimeoutError:
                message = None
            if self.loop.time() - joined_at > REJOIN_SECONDS:
                async with self.lock:
                    for group in self.members:
                        await self.layer.group_add(group, self.channel_name)
                joined_at = self.loop.time()
            if message is None:
                continue
            for consumer in list(self.members.get(message.get("group", ""), ())):
                try:
                    await consumer.push(message)
                except Exception:  # one broken socket must not keep the push from the others
                    logger.warning("live push to a socket failed", exc_info=True)


_fanout: _ProcessFanout | None = None


def _fanout_for_this_loop() -> _ProcessFanout:
    global _fanout
    if _fanout is None or _fanout.loop is not asyncio.get_running_loop():  # tests run a loop each
        _fanout = _ProcessFanout(get_channel_layer())
    return _fanout


class LiveConsumer(AsyncWebsocketConsumer):
    """One socket per browser tab, joined to the groups of the user's tenants only (through
    the process's fan-out: the socket has no layer channel of its own).

    Messages are htmx out-of-band fragments; each carries the event id so a page can tell
    it missed one.
    """

    channel_layer_alias = "live-sockets-have-no-channel-of-their-own"  # not configured: None
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
        # Joined before the accept, so that nothing after the memberships were read is missed
        # (a revoked membership above all); what the fan-out hands over until the accept is
        # kept, then handled in order.
        self.before_accept: list[dict[str, Any]] | None = []
        self.fanout = _fanout_for_this_loop()
        await self.fanout.join(self, self.groups_joined)
        await self.accept()
        while self.before_accept:
            await self._handle(self.before_accept.pop(0))
        self.before_accept = None

    async def disconnect(self, code: int) -> None:
        if getattr(self, "fanout", None) is not None:
            await self.fanout.leave(self, self.groups_joined)

    async def push(self, message: dict[str, Any]) -> None:
        """A layer message of one of the socket's groups (from the fan-out). Pushes never touch
        the database, so unlike Channels' dispatch this closes no stale connections: through
        the one thread every ``sync_to_async`` of the process shares, that hop per push and
        socket was most of the web process's time at a few hundred sockets."""
        if self.before_accept is not None:
            self.before_accept.append(message)
        else:
            await self._handle(message)

    async def _handle(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is not None:
            await handler(message)

    async def event_push(self, message: dict[str, Any]) -> None:
        await self.send(text_data=_fragment(message))

    async def live_batch(self, message: dict[str, Any]) -> None:
        """Pushes that came within one interval (core.live.PUSH_INTERVAL_SECONDS), in order, the
        events' fragments in one frame: htmx's ws extension swaps each fragment of a message in
        turn, so a page sees every event as if each had come alone, and the web process sends
        one frame per socket instead of one per event (at hundreds of sockets, the frames were
        what it spent its time on)."""
        fragments: list[str] = []
        for each in message["messages"]:
            if each["type"] == "event.push":
                fragments.append(_fragment(each))
                continue
            if fragments:  # what came before another kind of message goes first
                await self.send(text_data="".join(fragments))
                fragments = []
            await self._handle(each)
        if fragments:
            await self.send(text_data="".join(fragments))

    async def membership_changed(self, message: dict[str, Any]) -> None:
        """The user's role in a tenant was added, changed or removed: close, so that nothing of
        a tenant they left is pushed here and the browser reconnects with the groups (and the
        role) they hold now."""
        await self.close(code=1012)  # "service restart": the browser reconnects
