"""``manage.py bench_peer --workload W``: Runwarden's driver for ``make bench-peers``.

It keeps the contract of bench/peers/__init__.py with the machinery of ``manage.py bench``:
2 step-worker processes on Celery's threads pool (the waiting lanes' shape) plus the
dispatcher, a warm-up of as many runs as every peer's driver (``WARM_UP_RUNS``), then the
workload from this process as the one submitting client (``run_start`` in process, as an
integrator's Python code would), and one ``PEER_RESULT`` line.

- ``noop``: 1,000 runs of ``bench.noop``, 2 workers x 4 slots;
- ``keyed``: 200 runs of ``bench.keyed`` over 10 entity keys (the step's declared lock), 20 slots;
- ``agent_io``: 300 runs of ``bench.agent_io`` (an async step awaiting 1 s), 2 x 50 slots;
- ``signal``: 20 runs of ``bench.gated`` parked on their approval, each approved in turn through
  the HTTP API (in process, with an operator's token, on a thread that prepares its statements
  as the web process's request threads do): approve sent -> the gated step finished.
"""

from __future__ import annotations

import io
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from bench.harness import stop_all_started
from bench.management.commands.bench import Bench, PhaseSkipped, bench_session
from bench.peers.common import STEP_PROCESSES, WARM_UP_RUNS, WORKLOADS, emit


class Command(BaseCommand):
    help = "Runwarden's driver for make bench-peers: one workload, one PEER_RESULT line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
        parser.add_argument("--runs", type=int, default=0, help="override the workload's run count")

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql" or not settings.REDIS_URL:
            raise CommandError("bench_peer needs DATABASE_URL (PostgreSQL) and REDIS_URL")
        if "peers" not in str(connection.settings_dict["NAME"]):
            raise CommandError("bench_peer cancels unfinished runs: run it on a database named *peers*")
        workload = WORKLOADS[options["workload"]]
        runs = options["runs"] or workload.runs
        log = io.StringIO()  # the bench's progress lines; stdout carries only the result
        bench = bench_session(lambda line: print(line, file=log), {"budget": 900.0, "max_window": 600.0})
        result: dict[str, Any] = {"engine": "runwarden", "workload": workload.name, "runs": runs}
        try:
            result |= _measure(bench, workload.name, runs, workload.slots, workload.keys)
        except PhaseSkipped as skipped:
            result |= {"ok": False, "notes": str(skipped)}
        finally:
            stop_all_started()
        if bench.problems:
            result |= {"ok": False, "problems": bench.problems}
        result.setdefault("notes", "; ".join(bench.notes))
        result["storage"] = "PostgreSQL (Celery on Redis as the transport)"
        emit(result)


def _measure(bench: Bench, workload: str, runs: int, slots: int, keys: int) -> dict[str, Any]:
    per_worker = slots // STEP_PROCESSES
    if workload == "noop":
        got = bench.pipeline(
            "bench.noop", 1, runs, STEP_PROCESSES, threads=per_worker, warm_up_runs=min(WARM_UP_RUNS, runs)
        )
        return {
            "ok": got["complete"] and got["succeeded"] == runs,
            "finished": got["succeeded"],
            "elapsed_s": got["seconds"],
            # the bench keeps % of one core over the window: as CPU seconds, like the peers'
            "cpu_s": {
                kind: round(got["cpu"][kind] / 100 * got["seconds"], 2)
                for kind in ("steps", "engine", "postgres")
                if kind in got["cpu"]
            },
        }
    if workload == "keyed":
        got = bench.keyed(STEP_PROCESSES, slots, runs, keys, warm_up_runs=min(WARM_UP_RUNS, runs))
        return {
            "ok": got["elapsed_s"] is not None and got["succeeded"] == runs,
            "finished": got["succeeded"],
            "elapsed_s": got["elapsed_s"],
            "max_overlap": got["max_overlap"],
            "key_handoff_ms": got["key_handoff_ms"],
        }
    if workload == "agent_io":
        got = bench.agent_io(STEP_PROCESSES, slots, runs, warm_up_runs=min(WARM_UP_RUNS, runs))
        return {
            "ok": got["elapsed_s"] is not None and got["succeeded"] == runs,
            "finished": got["succeeded"],
            "elapsed_s": got["elapsed_s"],
            "max_pg_connections": got["max_pg_connections"],
            "worker_rss_mb": got["worker_rss_mb"],
        }
    got = bench.approvals(STEP_PROCESSES, runs)
    return {
        "ok": got["n"] == runs,
        "finished": got["n"],
        "latency_ms": {"p50": got["p50"], "p99": got["p99"]},
    }
