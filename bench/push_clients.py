"""Browser consoles for the push bench: N real websockets to a web process's ``/ws/live/``, each
with a logged-in user's session cookie, in one asyncio process of their own (no Django here).

Run as ``python -m bench.push_clients``; ``PushClients`` drives it over its stdin and stdout, one
JSON object a line. The first line says where to connect and with which cookies; then:

- ``{"connect": N}``: open sockets until N are open; answers ``{"open": N, "failed": [...]}``;
- ``{"report": {"after_id": A, "upto_id": B, "ids": false}}``: what the sockets received of the
  events A < id <= B: per socket how many (which, with ids) and any frame of another tenant;
  the commit → delivered latencies' p50, p99 and max;
- ``{"quit": true}``: close every socket and exit.

A push's latency is the moment its frame came off the socket here minus its ``committed_at``
(taken by the writer right after its transaction committed, on this machine's clock). Frames
are recorded as they come, whatever is asked meanwhile, so a slow answer never delays a frame.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.peers.common import percentile

# One fragment per event; a frame carries one or several (core.consumers.LiveConsumer.live_batch).
EVENT_FRAGMENT = re.compile(
    r'data-event-id="(\d+)" data-tenant-id="(\d+)"[^>]*? data-committed-at="([0-9.]+)"'
)
CONNECTS_AT_ONCE = 50  # as many browsers opening the console at the same moment
CONNECT_TIMEOUT_SECONDS = 30.0


@dataclass
class SocketTally:
    """What one socket received: event ids and their latencies (compact arrays: 500 sockets ×
    thousands of pushes), and any frame of a tenant the socket's user is not a member of."""

    tenant_id: int
    ids: array[int] = field(default_factory=lambda: array("q"))
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    foreign: int = 0
    other_frames: int = 0
    closed: str = ""


async def _read(ws: Any, tally: SocketTally) -> None:
    try:
        async for frame in ws:
            received = time.time()
            events = EVENT_FRAGMENT.findall(frame) if isinstance(frame, str) else []
            if not events:
                tally.other_frames += 1
            for event_id, tenant_id, committed in events:
                if int(tenant_id) != tally.tenant_id:
                    tally.foreign += 1
                tally.ids.append(int(event_id))
                tally.latencies_ms.append((received - float(committed)) * 1000)
    except Exception as exc:  # the socket closed under us: say so in the report
        tally.closed = f"{type(exc).__name__}: {exc}"[:200]
    else:
        tally.closed = f"closed {getattr(ws, 'close_code', '')}"


def _report(tallies: list[SocketTally], after_id: int, upto_id: int, with_ids: bool) -> dict[str, Any]:
    latencies: list[float] = []
    sockets = []
    for tally in tallies:
        ids = set()
        for event_id, ms in zip(tally.ids, tally.latencies_ms, strict=True):
            if after_id < event_id <= upto_id:
                ids.add(event_id)
                latencies.append(ms)
        sockets.append(
            {
                "tenant_id": tally.tenant_id,
                "received": len(ids),
                "foreign": tally.foreign,
                "other_frames": tally.other_frames,
                "closed": tally.closed,
                **({"ids": sorted(ids)} if with_ids else {}),
            }
        )
    return {
        "sockets": sockets,
        "deliveries": len(latencies),
        "p50": _round(percentile(latencies, 50)),
        "p99": _round(percentile(latencies, 99)),
        "max": _round(max(latencies, default=None)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _serve() -> None:
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    # Every line through this reader: sys.stdin's own buffer would swallow commands sent early.
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    wanted: list[dict[str, Any]] = config["sockets"]
    tallies: list[SocketTally] = []
    sockets: list[Any] = []
    readers: list[asyncio.Task[None]] = []

    async def open_one(spec: dict[str, Any]) -> tuple[Any, str]:
        try:
            ws = await asyncio.wait_for(
                connect(
                    config["url"],
                    origin=config["origin"],
                    additional_headers={"Cookie": spec["cookie"]},
                    max_queue=None,  # record every frame as it comes; never push back on the server
                    open_timeout=CONNECT_TIMEOUT_SECONDS,
                ),
                CONNECT_TIMEOUT_SECONDS,
            )
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"[:200]
        return ws, ""

    def answer(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        command = json.loads(line)
        if "connect" in command:
            failed: list[str] = []
            target = min(int(command["connect"]), len(wanted))
            while len(sockets) < target and len(failed) < target:
                batch = wanted[len(sockets) + len(failed) : target][:CONNECTS_AT_ONCE]
                if not batch:
                    break
                for spec, (ws, error) in zip(
                    batch, await asyncio.gather(*(open_one(spec) for spec in batch)), strict=True
                ):
                    if ws is None:
                        failed.append(error)
                        continue
                    tally = SocketTally(tenant_id=int(spec["tenant_id"]))
                    tallies.append(tally)
                    sockets.append(ws)
                    readers.append(asyncio.create_task(_read(ws, tally)))
            answer({"open": len(sockets), "failed": failed})
        elif "report" in command:
            window = command["report"]
            answer(_report(tallies, int(window["after_id"]), int(window["upto_id"]), bool(window.get("ids"))))
        elif command.get("quit"):
            break
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    for task in readers:
        task.cancel()


def main() -> None:
    try:
        import uvloop  # comes with uvicorn[standard]; the web process runs on it too

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve())


class PushClients:
    """The client process, driven from a synchronous caller (the bench, a test): always
    ``close()`` it (a ``with`` block does)."""

    def __init__(self, base_url: str, sockets: Sequence[tuple[str, int]]) -> None:
        """``sockets``: (session cookie header, the tenant id its user belongs to) per socket."""
        host = base_url.split("://", 1)[1]
        config = {
            "url": f"ws://{host}/ws/live/",
            "origin": base_url,
            "sockets": [{"cookie": cookie, "tenant_id": tenant_id} for cookie, tenant_id in sockets],
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.push_clients"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own: the bench counts its CPU apart
        )
        self._send(config)

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self._send(message)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the push client process exited ({self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def connect(self, count: int) -> dict[str, Any]:
        """Open sockets until ``count`` are open; returns ``{"open": n, "failed": [reasons]}``."""
        return self._ask({"connect": count})

    def report(self, after_id: int, upto_id: int, ids: bool = False) -> dict[str, Any]:
        """What the sockets received of the events ``after_id < id <= upto_id``: per socket how
        many (and which, with ``ids``) and how many of another tenant ever; the latencies' p50,
        p99 and max over every delivery, in ms."""
        return self._ask({"report": {"after_id": after_id, "upto_id": upto_id, "ids": ids}})

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._send({"quit": True})
                self.process.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> PushClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
