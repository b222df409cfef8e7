"""procrastinate (3.10) driver of ``make bench-peers``.

Run from the repository root with the peers' virtualenv::

    .peers/venv/bin/python -m bench.peers.engine_procrastinate --workload noop [--runs N]

How procrastinate runs here: the driver makes the database ``peers_procrastinate`` fresh and
applies procrastinate's schema to it, then starts 2 worker processes (this module with
``--worker I``), each ``App.run_worker_async(queues=[workload], concurrency=slots / 2)``, so the
2 workers hold exactly the workload's slots between them. Every task is an ``async def``, as
procrastinate's docs ask for tasks run with ``concurrency`` > 1. The driver itself is the one
submitting client: it defers every job with the synchronous ``Task.defer`` (one ``INSERT`` a
job, as a web app would). procrastinate has no server: its "engine" is the library inside the
worker processes plus PostgreSQL, so ``cpu_s.engine`` is 0.

Workers are woken by LISTEN/NOTIFY when a job is inserted; when a fetch finds nothing to run
they wait for the next notification or ``fetch_job_polling_interval`` (5 s by default). A job
whose lock is held becomes runnable when the holder finishes, which notifies nobody, so
``--polling-interval`` (default 0.01 s, the same as the DBOS driver's queue polling) is set on
the workers; the result's notes say so. On this machine ``keyed`` took 51 s at the default 5 s,
2.0 s at 0.1 s and 1.2 s at 0.01 s; ``noop`` and ``agent_io`` hardly change (notified).

What each workload maps to:

- ``noop``: an async task that returns at once, queue ``noop`` (2 x 4 slots);
- ``keyed``: an async task awaiting 50 ms, deferred with ``configure(lock=key)`` (procrastinate's
  own way of running one job per key at a time), 2 x 10 slots; each body appends its (start,
  end) to a file of its worker's (no database write), from which the overlap is computed;
- ``agent_io``: an async task awaiting ``asyncio.sleep(1.0)``, 2 x 50 slots; PostgreSQL
  connections to ``peers_procrastinate`` are sampled;
- ``signal``: not supported. procrastinate has no signal, event or awaitable a running job can
  park on: a job is a function call and ends when it returns. The result says
  ``"unsupported": true`` (the orchestrator shows "—").

The client counts finished jobs with a plain query on ``procrastinate_jobs`` every 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg2  # type: ignore[import-untyped]
from procrastinate import App, JobContext, PsycopgConnector

from bench.peers import common

ENGINE = "procrastinate"
DATABASE = "peers_procrastinate"
DEFAULT_POLLING_INTERVAL = 0.01
DONE_POLL_SECONDS = 0.02
DEADLINE_SECONDS = 300.0
FAILED_STATUSES = ("failed", "cancelled", "aborted")


def spans_file(index: int) -> Path:
    return common.LOG_DIR / f"procrastinate-spans-{index}.txt"


class Spans:
    """Where this worker's keyed bodies write their (job id, key, start, end)."""

    file: Any = None


async def noop() -> None:
    return None


async def hold_key(context: JobContext, key: str, seconds: float) -> None:
    start = time.time()
    await asyncio.sleep(seconds)
    end = time.time()
    if Spans.file is not None:
        Spans.file.write(f"{context.job.id} {key} {start!r} {end!r}\n")
        Spans.file.flush()


async def await_model(seconds: float) -> None:
    await asyncio.sleep(seconds)


def build_app(url: str) -> App:
    app = App(connector=PsycopgConnector(conninfo=url))
    app.task(name="noop", queue="noop")(noop)
    app.task(name="keyed", queue="keyed", pass_context=True)(hold_key)
    app.task(name="agent_io", queue="agent_io")(await_model)
    return app


# ---------------------------------------------------------------------------- worker process


def run_worker(index: int, workload: common.Workload, url: str, polling_interval: float) -> None:
    """One step-executing process: a procrastinate worker on the workload's queue."""
    if workload.name == "keyed":
        Spans.file = spans_file(index).open("a")

    async def work() -> None:
        app = build_app(url)
        async with app.open_async():
            await app.run_worker_async(
                queues=[workload.name],
                name=f"worker-{index}",
                concurrency=workload.slots // common.STEP_PROCESSES,
                fetch_job_polling_interval=polling_interval,
                install_signal_handlers=True,  # SIGTERM: stop after the running jobs
            )

    asyncio.run(work())


# ---------------------------------------------------------------------------- the client


class Monitor:
    """One plain connection for the client's own bookkeeping (counting finished jobs)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, list(params))
            return cursor.fetchone()

    def counts(self, first_id: int, last_id: int) -> tuple[int, int]:
        done, failed = self.value(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
            " count(*) FILTER (WHERE status::text = ANY(%s))"
            " FROM procrastinate_jobs WHERE id BETWEEN %s AND %s",
            [list(FAILED_STATUSES), first_id, last_id],
        )
        return int(done), int(failed)

    def close(self) -> None:
        self.conn.close()


def batch(app: App, monitor: Monitor, workload: common.Workload, runs: int) -> dict[str, Any]:
    """Defer ``runs`` jobs, wait for all to finish: elapsed from the first defer."""
    task = app.tasks[workload.name]
    started = time.monotonic()
    ids = []
    for i in range(runs):
        if workload.name == "keyed":
            key = f"key-{i % workload.keys}"
            ids.append(task.configure(lock=key).defer(key=key, seconds=workload.hold_seconds))
        elif workload.name == "agent_io":
            ids.append(task.defer(seconds=workload.wait_seconds))
        else:
            ids.append(task.defer())
    submitted = time.monotonic() - started
    deadline = started + DEADLINE_SECONDS
    while True:
        done, failed = monitor.counts(min(ids), max(ids))
        if done + failed >= runs or time.monotonic() > deadline:
            break
        time.sleep(DONE_POLL_SECONDS)
    elapsed = time.monotonic() - started
    return {
        "elapsed_s": round(elapsed, 3),
        "submit_s": round(submitted, 3),
        "finished": done,
        "failed": failed,
        "ids": (min(ids), max(ids)),
    }


def read_spans(first_id: int, last_id: int) -> dict[str, list[tuple[float, float]]]:
    intervals: dict[str, list[tuple[float, float]]] = {}
    for index in range(common.STEP_PROCESSES):
        path = spans_file(index)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            job_id, key, start, end = line.split()
            if first_id <= int(job_id) <= last_id:
                intervals.setdefault(key, []).append((float(start), float(end)))
    return intervals


def measure(workload: common.Workload, polling_interval: float) -> dict[str, Any]:
    url = common.fresh_database(DATABASE)
    app = build_app(url)
    app.open()
    app.schema_manager.apply_schema()
    per_worker = workload.slots // common.STEP_PROCESSES
    notes = [
        f"2 worker processes, queue {workload.name!r}, concurrency={per_worker} each (async tasks);"
        " the client defers with Task.defer",
        f"fetch_job_polling_interval={polling_interval} (procrastinate default 5.0; LISTEN/NOTIFY on)",
    ]
    if workload.name == "keyed":
        notes.append("one job per key at a time via configure(lock=key)")
    result: dict[str, Any] = {"engine": ENGINE, "workload": workload.name, "runs": workload.runs}
    with common.processes() as procs:
        for index in range(common.STEP_PROCESSES):
            name = f"procrastinate-worker-{index}"
            (common.LOG_DIR / f"{name}.log").unlink(missing_ok=True)
            spans_file(index).unlink(missing_ok=True)
            procs.spawn(
                name,
                "steps",
                [
                    sys.executable,
                    "-m",
                    "bench.peers.engine_procrastinate",
                    "--workload",
                    workload.name,
                    "--worker",
                    str(index),
                    "--polling-interval",
                    str(polling_interval),
                ],
                env={"PEERS_PROCRASTINATE_URL": url, "PYTHONUNBUFFERED": "1"},
            )
        monitor = Monitor(url)
        try:

            def ready() -> bool:
                if procs.dead():
                    raise RuntimeError(f"worker exited: {procs.dead()}")
                return int(monitor.value("SELECT count(*) FROM procrastinate_workers")[0]) >= len(procs.procs)

            common.wait_until(ready, 60, interval=0.1, what="procrastinate workers")
            warm = min(common.WARM_UP_RUNS, workload.runs)
            warm_up = batch(app, monitor, workload, warm)
            if warm_up["finished"] != warm:
                raise RuntimeError(f"warm-up did not finish: {warm_up}")
            cpu_before = procs.cpu_seconds()
            with common.connection_sampler(DATABASE) as sampler:
                measured = batch(app, monitor, workload, workload.runs)
            cpu_after = procs.cpu_seconds()
            dead = procs.dead()
        finally:
            monitor.close()
            app.close()
    first_id, last_id = measured.pop("ids")
    result.update(measured)
    if workload.name == "keyed":
        intervals = read_spans(first_id, last_id)
        result["max_overlap"] = common.max_overlap(intervals)
        if sum(len(v) for v in intervals.values()) != measured["finished"]:
            notes.append("some keyed bodies left no (start, end)")
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


def unsupported(workload: common.Workload) -> dict[str, Any]:
    return {
        "engine": ENGINE,
        "workload": workload.name,
        "ok": True,
        "unsupported": True,
        "runs": workload.runs,
        "finished": 0,
        "elapsed_s": None,
        "notes": "procrastinate has no signal or awaitable primitive: a job cannot park waiting"
        " for an external event (only defer a new job, or poll from inside a running one)",
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--workload", choices=sorted(common.WORKLOADS), required=True)
    parser.add_argument("--runs", type=int, default=0, help="override the workload's run count")
    parser.add_argument(
        "--polling-interval",
        type=float,
        default=DEFAULT_POLLING_INTERVAL,
        help="the workers' fetch_job_polling_interval, seconds",
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workload = common.workload_from(args)
    if args.worker is not None:
        run_worker(args.worker, workload, os.environ["PEERS_PROCRASTINATE_URL"], args.polling_interval)
        return
    if workload.name == "signal":
        result = unsupported(workload)
    else:
        try:
            result = measure(workload, args.polling_interval)
        except Exception as error:
            result = common.failed_result(ENGINE, workload, error)
    with contextlib.suppress(BrokenPipeError):
        common.emit(result)


if __name__ == "__main__":
    # Run as the importable module, not __main__, so the App and its tasks live where
    # procrastinate expects them (it warns about an App made in the main module).
    import importlib

    importlib.import_module("bench.peers.engine_procrastinate").main()
