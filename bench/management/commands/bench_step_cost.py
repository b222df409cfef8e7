"""``manage.py bench_step_cost``: where one step's time goes, in one process, on one connection.

Starts ``--runs`` one-step ``bench.noop`` runs, admits the first, then runs the step chain
exactly as a busy worker does (``step_execute`` with the worker's lanes: each finish admits
and starts the next ready step), and reports per step: wall time, statements and the time
spent inside them, the rest being Python (ORM, Runwarden) and commits. ``--cprofile`` adds
the functions that took the most time, ``--by-statement`` each statement's count and time per
step (a prepared one shown as the SQL it runs). No broker round trip or Celery overhead is included:
this is the engine's own cost per step, the part ``make bench``'s ratio is made of.

Run it on the bench database (``make bench`` creates it), e.g.::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/runwarden_bench REDIS_URL=redis://127.0.0.1:6379/2 \\
    RUNWARDEN_WORKFLOW_MODULES=bench.workloads DEBUG=1 .venv/bin/python manage.py bench_step_cost
"""

from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import re
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

import bench.workloads  # noqa: F401  (declares bench.noop, whatever RUNWARDEN_WORKFLOW_MODULES names)
from bench.harness import bench_tenant
from core import rawsql
from runs.dispatch import dispatch_round
from runs.executor import step_execute
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_start

ACTOR = "bench_step_cost"
UNFINISHED_RUNS = [RunStatus.PENDING, RunStatus.RUNNING]


def _backend_pid() -> int:
    if connection.vendor != "postgresql":
        return -1  # SQLite runs in this process: no backend of its own
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a local process (the PostgreSQL backend: the database runs here)."""
    if pid < 0:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _readable(sql: str, prepared: dict[str, str]) -> str:
    """One line per statement: a prepared one's ``EXECUTE`` (under any of its generations) shown
    as the statement it runs (``prepared``: by name stem), the admission shard's random start and
    the values dropped."""

    def shown(match: re.Match[str]) -> str:
        text = prepared.get(match.group(1))
        return f"[prepared] {' '.join(text.split()) if text else match.group(1)}"

    sql = re.sub(r"EXECUTE (rw_[0-9a-f]{20})_\d+(\([^)]*\))?", shown, sql)
    sql = re.sub(r"(PREPARE|DEALLOCATE) rw_[0-9a-f]{20}_\d+.*", r"\1 (planning a prepared statement)", sql)
    sql = re.sub(r"(SET LOCAL \w+ = off; )+EXPLAIN .*", "(planning a prepared statement)", sql)
    sql = re.sub(
        r"(mod\(n \+ )\d+|(pg_advisory_xact_lock\(\d+, )\d+", lambda m: f"{m.group(1) or m.group(2)}k", sql
    )
    return sql[:150]


class Command(BaseCommand):
    help = "Measure the engine's own cost per step in one process (statements, time in them, the rest)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=300, help="one-step runs to start and run")
        parser.add_argument("--cprofile", type=int, default=0, help="also print the N costliest functions")
        parser.add_argument(
            "--by-statement", action="store_true", help="also print each statement's count and time per step"
        )
        parser.add_argument("--any-database", action="store_true", help="run on a database not named *bench*")

    def handle(self, *args: Any, **options: Any) -> None:
        previously = logging.root.manager.disable
        logging.disable(logging.INFO)  # a line per step would be measured too
        try:
            self._measure(options)
        finally:
            logging.disable(previously)

    def _measure(self, options: dict[str, Any]) -> None:
        if "bench" not in str(connection.settings_dict["NAME"]) and not options["any_database"]:
            raise CommandError(
                "run this on a database named *bench* (it cancels the bench tenant's runs), "
                "or pass --any-database"
            )
        tenant = bench_tenant()
        Step.objects.filter(tenant=tenant, status__in=[StepStatus.READY, StepStatus.PENDING]).update(
            status=StepStatus.CANCELLED
        )
        Run.objects.filter(tenant=tenant, status__in=UNFINISHED_RUNS).update(status=RunStatus.CANCELLED)

        runs = options["runs"]
        began = time.perf_counter()
        for _ in range(runs):
            run_start(tenant=tenant, workflow="bench.noop", input={}, actor=ACTOR)
        start_ms = (time.perf_counter() - began) * 1000 / runs

        admitted = dispatch_round(limit=1)
        if not admitted:
            raise CommandError("nothing was admitted: is a step of the bench tenant still leased?")
        first = admitted[0]
        lanes = frozenset(Step.objects.filter(tenant=tenant).values_list("lane", flat=True).distinct())
        spent = {"statements": 0, "seconds": 0.0}
        by_statement: dict[str, list[float]] = {}

        def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            t = time.perf_counter()
            try:
                return execute(sql, params, many, context)
            finally:
                took = time.perf_counter() - t
                spent["statements"] += 1
                spent["seconds"] += took
                by_statement.setdefault(" ".join(sql.split()), []).append(took)

        backend = _backend_pid()
        profile = cProfile.Profile(time.process_time) if options["cprofile"] else None
        before = Step.objects.filter(tenant=tenant, status=StepStatus.SUCCEEDED).count()
        began, cpu_began, backend_began = time.perf_counter(), time.process_time(), _cpu_seconds(backend)
        with connection.execute_wrapper(timed):
            if profile:
                profile.enable()
            step_execute(step_id=first.step_id, token=first.token, lanes=lanes)
            if profile:
                profile.disable()
        wall = time.perf_counter() - began
        cpu, backend_cpu = time.process_time() - cpu_began, _cpu_seconds(backend) - backend_began
        steps = Step.objects.filter(tenant=tenant, status=StepStatus.SUCCEEDED).count() - before
        if steps == 0:
            raise CommandError("no step finished")
        per = 1000 / steps
        self.stdout.write(
            f"run_start: {start_ms:.2f} ms per run\n"
            f"steps run in one chain: {steps} of {runs}\n"
            f"per step: {wall * per:.2f} ms wall, {spent['statements'] / steps:.1f} statements, "
            f"{spent['seconds'] * per:.2f} ms inside them, {(wall - spent['seconds']) * per:.2f} ms the rest "
            f"(Python, commits){' — under cProfile, so slower' if profile else ''}\n"
            f"CPU per step: {cpu * per:.2f} ms in this process, {backend_cpu * per:.2f} ms in its PostgreSQL "
            "backend (steadier than wall time on a machine whose speed drifts)"
        )
        if options["by_statement"]:
            prepared = rawsql.prepared_texts() if rawsql.on_postgresql() else {}
            grouped: dict[str, list[float]] = {}
            for sql, took in by_statement.items():
                grouped.setdefault(_readable(sql, prepared), []).extend(took)
            for sql, took in sorted(grouped.items(), key=lambda item: -sum(item[1])):
                self.stdout.write(f"{len(took) / steps:5.2f}/step {sum(took) * per:6.3f} ms/step  {sql}")
        if profile:
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(options["cprofile"])
            self.stdout.write(out.getvalue())
