"""DBOS Transact (Python, 3.4) driver of ``make bench-peers``.

Run from the repository root with the peers' virtualenv::

    .peers/venv/bin/python -m bench.peers.engine_dbos --workload noop [--runs N]

How DBOS runs here: the driver makes the database ``peers_dbos`` fresh, creates DBOS's system
schema in it (``DBOS.migrate``), then starts 2 worker processes (this module with ``--worker
I``), each a launched ``DBOS`` application with its own ``executor_id`` that registers the
workload's queue with ``worker_concurrency`` = half the workload's slots, so the 2 workers hold
exactly the workload's slots between them. The driver itself is the one submitting client: a
``DBOSClient`` (no workflow code runs in it) enqueues every run and sends the signals. DBOS has
no server: its "engine" is the library inside the worker processes plus PostgreSQL, so
``cpu_s.engine`` is 0 and PostgreSQL's own CPU is counted for no engine.

DBOS queues are found by polling: each worker polls each queue every ``polling_interval_sec``
(1 s by default) and claims at most as many workflows as it has free slots, so with 8 slots the
default caps ``noop`` near 8 runs a second. This driver sets ``--polling-interval`` (default
0.01 s) on the queue, the documented knob for lower latency, and says so in the result's notes.
0.01 s is the fastest setting that still paid on this 2-core machine: 1,000 ``noop`` runs took
28 s at 0.2 s, 11 s at 0.05 s, 6-7 s at 0.01 s and no less at 0.005 or 0.001 s.

What each workload maps to:

- ``noop``: a workflow with one no-op ``@DBOS.step`` (sync, as DBOS code usually is),
  on queue ``noop`` (2 x 4 slots);
- ``keyed``: a workflow whose one async step awaits 50 ms and returns its (start, end), on a
  *partitioned* queue (``partition_concurrency=1``, 2 x 10 slots) enqueued with
  ``queue_partition_key`` = the run's key: DBOS's own way of running one workflow per key at a
  time. The overlap is computed from the returned intervals;
- ``agent_io``: an async workflow whose one async step awaits ``asyncio.sleep(1.0)``, on
  queue ``agent_io`` (2 x 50 slots); PostgreSQL connections to ``peers_dbos`` are sampled;
- ``signal``: a workflow parked in ``DBOS.recv("go")`` (then one no-op step); the client
  ``send``s to one parked run at a time and waits on ``get_result`` (polling every 2 ms) for
  that run to finish. A parked DBOS workflow holds its queue slot (it is a running workflow),
  so the ``signal`` queue has no ``worker_concurrency``: 20 parked runs need 20 slots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg2  # type: ignore[import-untyped]
from dbos import DBOS, DBOSClient, EnqueueOptions

from bench.peers import common

ENGINE = "dbos"
DATABASE = "peers_dbos"
APP_NAME = "runwarden-peers"
APP_VERSION = "bench"  # one explicit version for both workers (else DBOS hashes the code)
DEFAULT_POLLING_INTERVAL = 0.01
SIGNAL_TOPIC = "go"
RESULT_POLL_SECONDS = 0.002  # the client's get_result polling in the signal workload
DONE_POLL_SECONDS = 0.02  # how often the client counts finished runs
DEADLINE_SECONDS = 300.0
FAILED_STATUSES = ("ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


# ---------------------------------------------------------------------------- workflows


@DBOS.step(name="noop_step")
def noop_step() -> None:
    return None


@DBOS.workflow(name="noop")
def noop_workflow() -> None:
    noop_step()


@DBOS.step(name="hold_key")
async def hold_key(key: str, seconds: float) -> list[float]:
    start = time.time()
    await asyncio.sleep(seconds)
    return [start, time.time()]


@DBOS.workflow(name="keyed")
async def keyed_workflow(key: str, seconds: float) -> list[float]:
    return await hold_key(key, seconds)


@DBOS.step(name="await_model")
async def await_model(seconds: float) -> None:
    await asyncio.sleep(seconds)


@DBOS.workflow(name="agent_io")
async def agent_io_workflow(seconds: float) -> None:
    await await_model(seconds)


@DBOS.workflow(name="signal")
def signal_workflow() -> Any:
    message = DBOS.recv(SIGNAL_TOPIC, timeout_seconds=DEADLINE_SECONDS)
    noop_step()
    return message


def queue_settings(workload: common.Workload, polling_interval: float) -> dict[str, Any]:
    per_worker = workload.slots // common.STEP_PROCESSES
    settings: dict[str, Any] = {"polling_interval_sec": polling_interval}
    if workload.name == "keyed":
        settings.update(worker_concurrency=per_worker, partition_concurrency=1)
    elif workload.name != "signal":
        settings.update(worker_concurrency=per_worker)
    return settings


# ---------------------------------------------------------------------------- worker process


def run_worker(index: int, workload: common.Workload, url: str, polling_interval: float) -> None:
    """One step-executing process: a launched DBOS application listening to the workload's queue."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    DBOS(
        config={
            "name": APP_NAME,
            "system_database_url": url,
            "application_version": APP_VERSION,
            "executor_id": f"worker-{index}",  # worker_concurrency is counted per executor
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    DBOS.register_queue(workload.name, **queue_settings(workload, polling_interval))
    print("WORKER READY", flush=True)
    stop.wait()
    DBOS.destroy()
    os._exit(0)


# ---------------------------------------------------------------------------- the client


class Monitor:
    """One plain connection for the client's own bookkeeping (counting finished runs)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True

    def counts(self, prefix: str) -> tuple[int, int]:
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
                " count(*) FILTER (WHERE status = ANY(%s))"
                " FROM dbos.workflow_status WHERE workflow_uuid LIKE %s",
                [list(FAILED_STATUSES), prefix + "%"],
            )
            done, failed = cursor.fetchone()
        return int(done), int(failed)

    def parked(self, prefix: str) -> int:
        """Runs whose ``recv`` has recorded its durable timeout, i.e. that are waiting."""
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(DISTINCT workflow_uuid) FROM dbos.operation_outputs"
                " WHERE function_name = 'DBOS.sleep' AND workflow_uuid LIKE %s",
                [prefix + "%"],
            )
            return int(cursor.fetchone()[0])

    def close(self) -> None:
        self.conn.close()


def run_args(workload: common.Workload, i: int) -> tuple[str | None, tuple[Any, ...]]:
    """The partition key (keyed only) and the arguments of run ``i``."""
    if workload.name == "keyed":
        key = f"key-{i % workload.keys}"
        return key, (key, workload.hold_seconds)
    if workload.name == "agent_io":
        return None, (workload.wait_seconds,)
    return None, ()


def enqueue_all(client: DBOSClient, workload: common.Workload, prefix: str, runs: int) -> list[str]:
    ids = []
    for i in range(runs):
        key, args = run_args(workload, i)
        options: EnqueueOptions = {
            "workflow_name": workload.name,
            "queue_name": workload.name,
            "workflow_id": f"{prefix}{i:05d}",
        }
        if key is not None:
            options["queue_partition_key"] = key
        ids.append(client.enqueue(options, *args).get_workflow_id())
    return ids


def wait_done(monitor: Monitor, prefix: str, runs: int, deadline: float) -> tuple[int, int]:
    while True:
        done, failed = monitor.counts(prefix)
        if done + failed >= runs or time.monotonic() > deadline:
            return done, failed
        time.sleep(DONE_POLL_SECONDS)


def batch(
    client: DBOSClient, monitor: Monitor, workload: common.Workload, prefix: str, runs: int
) -> dict[str, Any]:
    """Enqueue ``runs`` runs, wait for all to finish: elapsed from the first enqueue."""
    started = time.monotonic()
    ids = enqueue_all(client, workload, prefix, runs)
    submitted = time.monotonic() - started
    done, failed = wait_done(monitor, prefix, runs, started + DEADLINE_SECONDS)
    elapsed = time.monotonic() - started
    result: dict[str, Any] = {
        "elapsed_s": round(elapsed, 3),
        "submit_s": round(submitted, 3),
        "finished": done,
        "failed": failed,
    }
    if workload.name == "keyed" and done == runs:
        intervals: dict[str, list[tuple[float, float]]] = {}
        for i, workflow_id in enumerate(ids):
            start, end = client.retrieve_workflow(workflow_id).get_result()
            intervals.setdefault(f"key-{i % workload.keys}", []).append((start, end))
        result["max_overlap"] = common.max_overlap(intervals)
    return result


def signal_batch(client: DBOSClient, monitor: Monitor, prefix: str, runs: int) -> dict[str, Any]:
    """Park ``runs`` runs in ``recv``, then signal one at a time: send -> that run finished."""
    workload = common.WORKLOADS["signal"]
    started = time.monotonic()
    ids = enqueue_all(client, workload, prefix, runs)
    common.wait_until(
        lambda: monitor.parked(prefix) >= runs, DEADLINE_SECONDS, interval=0.05, what="parked runs"
    )
    latencies = []
    for workflow_id in ids:
        handle = client.retrieve_workflow(workflow_id)
        sent = time.monotonic()
        client.send(workflow_id, "go", SIGNAL_TOPIC)
        handle.get_result(polling_interval_sec=RESULT_POLL_SECONDS)
        latencies.append(time.monotonic() - sent)
    done, failed = monitor.counts(prefix)
    return {
        "elapsed_s": round(time.monotonic() - started, 3),
        "finished": done,
        "failed": failed,
        "latency_ms": common.latency_ms(latencies),
    }


def measure(workload: common.Workload, polling_interval: float) -> dict[str, Any]:
    url = common.fresh_database(DATABASE)
    DBOS.migrate(url)  # once, before the workers launch (else both would migrate at once)
    notes = [
        f"2 worker processes (DBOS.launch, executor_id worker-0/1), queue {workload.name!r}"
        f" {queue_settings(workload, polling_interval)} per worker; DBOSClient enqueues",
        f"queue polling_interval_sec={polling_interval} (DBOS default 1.0)",
    ]
    if workload.name == "keyed":
        notes.append("partitioned queue, partition_concurrency=1, queue_partition_key = the run's key")
    if workload.name == "signal":
        notes.append(
            "parked runs hold a queue slot in DBOS, so the signal queue has no worker_concurrency;"
            f" the client waits with get_result(polling_interval_sec={RESULT_POLL_SECONDS})"
        )
    result: dict[str, Any] = {"engine": ENGINE, "workload": workload.name, "runs": workload.runs}
    with common.processes() as procs:
        for index in range(common.STEP_PROCESSES):
            name = f"dbos-worker-{index}"
            (common.LOG_DIR / f"{name}.log").unlink(missing_ok=True)
            procs.spawn(
                name,
                "steps",
                [
                    sys.executable,
                    "-m",
                    "bench.peers.engine_dbos",
                    "--workload",
                    workload.name,
                    "--worker",
                    str(index),
                    "--polling-interval",
                    str(polling_interval),
                ],
                env={"PEERS_DBOS_URL": url, "PYTHONUNBUFFERED": "1"},
            )

        def ready() -> bool:
            if procs.dead():
                raise RuntimeError(f"worker exited: {procs.dead()}")
            return all("WORKER READY" in p.log.read_text(errors="replace") for p in procs.procs)

        common.wait_until(ready, 60, interval=0.1, what="DBOS workers")
        client = DBOSClient(system_database_url=url, application_name=APP_NAME)
        monitor = Monitor(url)
        try:
            warm = min(common.WARM_UP_RUNS, workload.runs)
            if workload.name == "signal":
                warm_up = signal_batch(client, monitor, "warm-", warm)
            else:
                warm_up = batch(client, monitor, workload, "warm-", warm)
            if warm_up["finished"] != warm:
                raise RuntimeError(f"warm-up did not finish: {warm_up}")
            cpu_before = procs.cpu_seconds()
            with common.connection_sampler(DATABASE) as sampler:
                if workload.name == "signal":
                    measured = signal_batch(client, monitor, "run-", workload.runs)
                else:
                    measured = batch(client, monitor, workload, "run-", workload.runs)
            cpu_after = procs.cpu_seconds()
            dead = procs.dead()
        finally:
            monitor.close()
            client.destroy()
    result.update(measured)
    result["ok"] = measured["finished"] == workload.runs and not measured["failed"] and not dead
    result["max_pg_connections"] = sampler.peak
    result["cpu_s"] = {
        "steps": round(cpu_after.get("steps", 0.0) - cpu_before.get("steps", 0.0), 2),
        "engine": 0.0,
    }
    notes.append("max_pg_connections counts the workers' pools, the client's and 1 monitoring connection")
    if dead:
        notes.append(f"processes died: {dead}")
    result["notes"] = "; ".join(notes)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--workload", choices=sorted(common.WORKLOADS), required=True)
    parser.add_argument("--runs", type=int, default=0, help="override the workload's run count")
    parser.add_argument(
        "--polling-interval", type=float, default=DEFAULT_POLLING_INTERVAL, help="queue polling, seconds"
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workload = common.workload_from(args)
    if args.worker is not None:
        run_worker(args.worker, workload, os.environ["PEERS_DBOS_URL"], args.polling_interval)
        return
    try:
        result = measure(workload, args.polling_interval)
    except Exception as error:
        result = common.failed_result(ENGINE, workload, error)
    with contextlib.suppress(BrokenPipeError):
        common.emit(result)


if __name__ == "__main__":
    main()
