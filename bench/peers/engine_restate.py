"""Restate's side of ``make bench-peers`` (``python -m bench.peers.engine_restate --workload W``).

How Restate runs here:

- the server is ``restate-server`` 1.7.12 (from npm, in ``.peers/node``), one node with every
  role, its base dir a fresh temp dir (its own durable log and RocksDB state, defaults: the
  log's writes fsynced, 24 partitions); ingress, admin and node ports free ones on 127.0.0.1,
  TCP only, web UI and telemetry off; process kind "engine";
- the services (``app`` below, restate-sdk 1.3) are served by hypercorn over HTTP/2 cleartext
  with two worker processes on one socket (``workers = 2``, the serving the SDK's docs show
  for production, with their stream and keep-alive limits), registered once with the admin API
  (``POST /deployments``); Restate takes one deployment URL per revision and balances nothing
  itself, so the two step-executing processes share the socket, the kernel handing each of the
  server's HTTP/2 connections to one of them; the hypercorn group is kind "steps";
- this process is the one submitting client: httpx (HTTP/2, h2c) to the ingress, each run one
  request-response call, at most ``slots`` calls in flight at once (an ``asyncio.Semaphore``),
  so at most ``slots`` bodies run at once.

What each workload maps to:

- noop: ``Runs/noop``, a service handler doing one ``ctx.run`` whose action returns None;
- keyed: ``Keys/{key}/hold``, a virtual object's exclusive handler whose ``ctx.run`` action
  awaits ``asyncio.sleep(0.05)`` and returns its (start, end) for ``max_overlap``;
- agent_io: ``Runs/model_call``, one ``ctx.run`` awaiting ``asyncio.sleep(1.0)``;
- signal: ``Parked/{id}/run``, a workflow awaiting its durable promise ``resume``; started with
  ``/send``; once all are parked (in the invocation table: running or suspended, the
  promise's journal entry written), the client resolves them one at a time with the shared
  handler ``Parked/{id}/resume``, the workflow's ``attach`` already waiting: resolve sent ->
  result returned.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import restate

from bench.peers import common

RESTATE_SERVER = common.PEERS_DIR / "node" / "node_modules" / ".bin" / "restate-server"


# ---------------------------------------------------------------------------- services

runs = restate.Service("Runs")
keys = restate.VirtualObject("Keys")
parked = restate.Workflow("Parked")


async def _noop() -> None:
    return None


async def _model_call(seconds: float) -> None:
    await asyncio.sleep(seconds)  # the stand-in for a model call


async def _hold(seconds: float) -> list[float]:
    start = time.time()
    await asyncio.sleep(seconds)
    return [start, time.time()]


@runs.handler()
async def noop(ctx: restate.Context) -> None:
    await ctx.run_typed("noop", _noop)


@runs.handler()
async def model_call(ctx: restate.Context, seconds: float) -> None:
    await ctx.run_typed("model_call", _model_call, restate.RunOptions(), seconds)


@keys.handler()  # exclusive: one invocation a key at a time
async def hold(ctx: restate.ObjectContext, seconds: float) -> list[float]:
    return await ctx.run_typed("hold", _hold, restate.RunOptions(), seconds)


@parked.main()
async def run(ctx: restate.WorkflowContext) -> str:
    return await ctx.promise("resume", type_hint=str).value()


@parked.handler()
async def resume(ctx: restate.WorkflowSharedContext) -> None:
    await ctx.promise("resume", type_hint=str).resolve("resumed")


app = restate.app(services=[runs, keys, parked])


# ---------------------------------------------------------------------------- the client


class Ingress:
    """The submitting client: calls over Restate's HTTP ingress, at most ``slots`` at once."""

    def __init__(self, url: str, admin_url: str, slots: int) -> None:
        # HTTP/2 with prior knowledge (h2c): every call a stream of one connection; over HTTP/1.1
        # (a connection a call) the calls waited far longer to reach the ingress at 100 at once.
        self.http = self._h2c(url)
        # The signal workload's attaches wait on a connection of their own: answered on the
        # connection that carried the resolve, each came ~40 ms late (a TCP delayed-ACK stall).
        self.attach = self._h2c(url)
        self.admin = httpx.AsyncClient(base_url=admin_url, timeout=httpx.Timeout(30.0))
        self.slots = asyncio.Semaphore(slots)

    @staticmethod
    def _h2c(url: str) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(
            http1=False, http2=True, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        return httpx.AsyncClient(base_url=url, transport=transport, timeout=httpx.Timeout(120.0))

    async def close(self) -> None:
        await self.attach.aclose()
        await self.http.aclose()
        await self.admin.aclose()

    async def call(self, path: str, body: Any = None) -> Any:
        """One request-response invocation; its JSON result (None if it failed)."""
        async with self.slots:
            response = await self.http.post(path, json=body)
        if response.status_code != 200:
            return None
        return response.json() if response.content else True

    async def query(self, sql: str) -> list[dict[str, Any]]:
        response = await self.admin.post(
            "/query", json={"query": sql}, headers={"accept": "application/json"}
        )
        response.raise_for_status()
        return list(response.json()["rows"])


async def run_many(client: Ingress, load: common.Workload, runs: int) -> int:
    """noop / agent_io: every run one call, ``slots`` in flight; how many finished."""
    if load.name == "agent_io":
        calls = [client.call("/Runs/model_call", load.wait_seconds) for _ in range(runs)]
    else:
        calls = [client.call("/Runs/noop") for _ in range(runs)]
    return sum(1 for r in await asyncio.gather(*calls) if r is not None)


async def run_keyed(
    client: Ingress, load: common.Workload, runs: int
) -> tuple[int, dict[str, list[tuple[float, float]]]]:
    names = [f"key-{k}" for k in range(load.keys)]
    calls = [client.call(f"/Keys/{names[i % len(names)]}/hold", load.hold_seconds) for i in range(runs)]
    intervals: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i, result in enumerate(await asyncio.gather(*calls)):
        if result is not None:
            intervals[names[i % len(names)]].append((result[0], result[1]))
    return sum(len(v) for v in intervals.values()), intervals


async def run_signal(client: Ingress, runs: int, prefix: str) -> list[float]:
    """Park every run, then resolve one at a time: seconds from resolve sent to result returned."""
    ids = [f"{prefix}-{i}" for i in range(runs)]
    for run_id in ids:
        response = await client.http.post(f"/Parked/{run_id}/run/send")
        response.raise_for_status()
    parked_sql = (
        "SELECT count(*) AS n FROM sys_invocation WHERE target_service_name = 'Parked' "
        f"AND target_handler_name = 'run' AND target_service_key LIKE '{prefix}-%' "
        "AND status IN ('running', 'suspended') AND journal_size >= 2"
    )  # the promise's GetPromise entry is the journal's second, after the input
    deadline = time.monotonic() + 60
    while (await client.query(parked_sql))[0]["n"] < runs:
        if time.monotonic() > deadline:
            raise TimeoutError("the workflows never parked")
        await asyncio.sleep(0.05)
    latencies: list[float] = []
    for run_id in ids:
        result = asyncio.ensure_future(client.attach.get(f"/restate/workflow/Parked/{run_id}/attach"))
        await asyncio.sleep(0.02)  # the attach is on its way before the resolve
        sent = time.perf_counter()
        (await client.http.post(f"/Parked/{run_id}/resume")).raise_for_status()
        response = await result
        if response.status_code == 200 and response.json() == "resumed":
            latencies.append(time.perf_counter() - sent)
    return latencies


async def warm_up(client: Ingress, load: common.Workload) -> None:
    """Until the registered services answer, then a few runs of the workload's own kind."""
    deadline = time.monotonic() + 30
    while await client.call("/Runs/noop") is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the services never answered through the ingress")
        await asyncio.sleep(0.1)
    n = common.WARM_UP_RUNS
    if load.name == "keyed":
        await run_keyed(client, load, n)
    elif load.name == "signal":
        await run_signal(client, n, prefix="warm")
    else:
        await run_many(client, load, n)


async def measure(ingress_url: str, admin_url: str, load: common.Workload) -> dict[str, Any]:
    client = Ingress(ingress_url, admin_url, load.slots)
    try:
        await warm_up(client, load)
        result: dict[str, Any] = {}
        started = time.perf_counter()
        if load.name == "keyed":
            finished, intervals = await run_keyed(client, load, load.runs)
            result["max_overlap"] = common.max_overlap(intervals)
        elif load.name == "signal":
            latencies = await run_signal(client, load.runs, prefix="run")
            finished = len(latencies)
            result["latency_ms"] = common.latency_ms(latencies)
        else:
            finished = await run_many(client, load, load.runs)
        result["elapsed_s"] = round(time.perf_counter() - started, 3)
        result["finished"] = finished
        return result
    finally:
        await client.close()


# ---------------------------------------------------------------------------- the driver


def server_binary() -> Path:
    """The native binary the npm package wraps (no node process in between), else the wrapper."""
    found = sorted(
        (common.PEERS_DIR / "node" / "node_modules" / "@restatedev").glob(
            "restate-server-*/bin/restate-server"
        )
    )
    return found[0] if found else RESTATE_SERVER


def register(admin_url: str, service_url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        response = httpx.post(f"{admin_url}/deployments", json={"uri": service_url}, timeout=10)
        if response.status_code in (200, 201):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"registering {service_url}: {response.status_code} {response.text[:300]}")
        time.sleep(0.2)


HYPERCORN_CONFIG = """\
bind = "127.0.0.1:{port}"
workers = {workers}
h2_max_concurrent_streams = 2147483647
keep_alive_max_requests = 2147483647
keep_alive_timeout = 2147483647
"""


def main(argv: list[str] | None = None) -> None:
    # Stopped from outside (a timeout's SIGTERM): unwind, so processes() stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = common.parse_args(argv)
    load = common.workload_from(args)
    notes = [
        "storage: restate-server 1.7.12, one node, its own durable log (replicated loglet, one replica) and "
        "RocksDB partition store in a temp dir, defaults (the log's writes fsynced, 24 partitions)",
        f"services: restate-sdk 1.3 app under hypercorn, HTTP/2 cleartext, workers={common.STEP_PROCESSES} "
        "on one socket, one deployment registered (POST /deployments)",
        f"client: httpx, HTTP/2 (h2c) to the ingress, request-response calls, at most {load.slots} in flight "
        "(asyncio.Semaphore); no send + attach",
    ]
    if load.name == "keyed":
        notes.append(
            "keyed: a virtual object's exclusive handler per key, ctx.run awaiting asyncio.sleep(0.05)"
        )
    if load.name == "signal":
        notes.append(
            "signal: a workflow awaiting its durable promise, resolved by the workflow's shared handler over "
            "the ingress; the workflow's attach already waiting before the resolve is sent"
        )
    result: dict[str, Any] = {"engine": "restate", "workload": load.name, "runs": load.runs, "ok": False}
    with tempfile.TemporaryDirectory(prefix="peers-restate-") as tmp, common.processes() as procs:
        ingress, admin, fabric, services = (common.free_port() for _ in range(4))
        ingress_url, admin_url = f"http://127.0.0.1:{ingress}", f"http://127.0.0.1:{admin}"
        procs.spawn(
            "restate-server",
            "engine",
            [
                str(server_binary()),
                "--base-dir",
                str(Path(tmp) / "restate"),
                "--node-name",
                "bench",
                "--no-logo",
            ],
            env={
                "RESTATE_LISTEN_MODE": "tcp",
                "RESTATE_BIND_ADDRESS": f"127.0.0.1:{fabric}",
                "RESTATE_INGRESS__BIND_ADDRESS": f"127.0.0.1:{ingress}",
                "RESTATE_ADMIN__BIND_ADDRESS": f"127.0.0.1:{admin}",
                "RESTATE_ADMIN__DISABLE_WEB_UI": "true",
                "RESTATE_DISABLE_TELEMETRY": "true",
                "RESTATE_LOG_DISABLE_ANSI_CODES": "true",
            },
        )
        config = Path(tmp) / "hypercorn.toml"
        config.write_text(HYPERCORN_CONFIG.format(port=services, workers=common.STEP_PROCESSES))
        procs.spawn(
            "restate-services",
            "steps",
            [sys.executable, "-m", "hypercorn", "--config", str(config), "bench.peers.engine_restate:app"],
        )
        try:
            common.wait_for_port("127.0.0.1", admin, timeout=60)
            common.wait_for_port("127.0.0.1", ingress, timeout=60)
            common.wait_for_port("127.0.0.1", services, timeout=60)
            register(admin_url, f"http://127.0.0.1:{services}")
            result.update(asyncio.run(measure(ingress_url, admin_url, load)))
            result["ok"] = result["finished"] == load.runs and not procs.dead()
        except Exception as exc:  # reported, not raised: the result line is the driver's answer
            notes.append(f"failed: {exc!r}")
        if procs.dead():
            notes.append(f"died: {', '.join(procs.dead())}")
        result["cpu_s"] = procs.cpu_seconds()
    result["notes"] = "; ".join(notes)
    common.emit(result)


if __name__ == "__main__":
    main()
