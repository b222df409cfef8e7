"""make bench: Runwarden's pipeline against raw Celery, side by side, on the same broker.

One invocation, real processes started (and always stopped) here, this machine's PostgreSQL
and Redis. Figures are ratios and per-step costs where they can be, since a machine's speed
drifts. Writes ``bench/results.json`` (stable keys, see docs/BENCHMARKS.md) and prints a table;
``--markdown`` prints it as Markdown, ``--report FILE`` prints the table of an earlier run.

Exit status: 0, also when the machine was slow and a phase ran out of time (reported as such);
1 when a run failed or any step needed more than one attempt (a correctness failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import import_module
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, connections, transaction
from django.db.models import Count, Max, Min
from django.test import Client
from django.utils import timezone

from approvals.models import ApprovalRequest
from bench import http_path, live_push, statement_counter
from bench.harness import (
    Monitor,
    ProcessSet,
    bench_tenant,
    cpu_snapshot,
    cpu_usage,
    log_tail,
    machine_info,
    rss_mb,
    start_runwarden_processes,
    start_step_workers,
    start_web_process,
    stop_all_started,
    wait_for_workers,
)
from bench.http_path import HttpClient, IngestTally
from bench.peers.common import PeakCount, free_port, percentile, wait_for_http
from bench.push_clients import PushClients
from bench.workloads import BENCH_TOOL, KEY_HOLD_SECONDS, TOOL_CALL_SECONDS
from core import rawsql
from core.models import Event, Membership, Role, Tenant, TenantQuota, User
from core.services import api_token_issue
from runs import services
from runs.models import Run, RunStatus, SideEffect, Step, StepStatus, ToolCall, ToolCallStatus
from runs.queue_depth import queue_place_take
from runs.services import run_start
from runs.transitions import UNFINISHED_RUN_STATUSES

BENCH_WORKFLOWS_MODULE = "bench.workloads"
COUNTER_PREFIX = "runwarden:bench:"
STATEMENTS_KEY = COUNTER_PREFIX + "statements"
OPERATOR = "bench-operator"
ACTOR = "bench"
WARMUP_RUNS = 5
WAIT_CHUNK = 100  # runs asked about per poll (wait_runs)
BAD_STATUSES = (RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CONFLICT)
FLUSH_WAIT = statement_counter.FLUSH_INTERVAL_SECONDS + 0.3
GOALS = {
    "ratio_vs_celery": "≥ 0.5",
    "pg_transactions_per_step": "≤ 4",
    "pg_transactions_per_further_step": "≤ 2",
    "approve_to_resume_ms": "median ≤ 60, worst ≤ 120 (over HTTP, one effect at 20 ms)",
    "api_latency_ms": "GET p50 ≤ 5, approve p50 ≤ 15",
    "ingest": "≥ 200 runs/s per web process",
    "ingest_16_clients": "p99 ≤ 100 ms",
    "agent_io": "elapsed ≤ 4.5 s on 100 slots (ideal 3 s)",
    "keyed": "overlap 0; elapsed near the ideal",
    "push_latency_ms": "p99 < 150 at 500 sockets; another tenant's sockets get nothing",
}


class PhaseSkipped(Exception):
    pass


@dataclass
class Waited:
    counts: dict[str, int]
    total: int
    done: bool  # every run reached succeeded or a bad status
    elapsed: float
    why: str = ""

    @property
    def succeeded(self) -> int:
        return self.counts.get(RunStatus.SUCCEEDED, 0)

    @property
    def bad(self) -> int:
        return sum(self.counts.get(status, 0) for status in BAD_STATUSES)


@dataclass
class Bench:
    out: Callable[[str], None]
    options: dict[str, Any]
    workdir: Path
    redis: redis.Redis
    monitor: Monitor
    tenant: Tenant
    env: dict[str, str]
    deadline: float
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engine: str = ""
    transactions_per_connection: float = 0.0

    # ------------------------------------------------------------------ helpers

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def budget(self, cap: float, reserve: float = 20.0) -> float:
        """Seconds a wait may take: its own cap, within what is left of the whole budget."""
        return max(0.0, min(cap, self.time_left() - reserve))

    def need(self, seconds: float, what: str) -> None:
        if self.time_left() < seconds:
            raise PhaseSkipped(f"{what}: skipped, {self.time_left():.0f} s of the time budget left")

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.out(f"    note: {text}")

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.out(f"    PROBLEM: {text}")

    def prepare(self) -> None:
        """Before each phase: nothing of ours running, the bench tenant's unfinished runs cancelled,
        the broker's queues (Redis DB of REDIS_URL) emptied, the bench's own connection closed."""
        stop_all_started()
        unfinished = Run.objects.filter(tenant=self.tenant).exclude(
            status__in=[RunStatus.SUCCEEDED, *BAD_STATUSES]
        )
        for run in unfinished.iterator():
            try:
                services.run_cancel(run=run, actor=ACTOR, reason="bench: cleaned up before a phase")
            except Exception:  # whatever the service refuses, the bench must start clean
                now = timezone.now()
                Step.objects.filter(run=run).exclude(
                    status__in=[StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED]
                ).update(status=StepStatus.CANCELLED, finished_at=now)
                Run.objects.filter(pk=run.pk).update(status=RunStatus.CANCELLED, finished_at=now)
        keep = ("_kombu.binding.", COUNTER_PREFIX)
        doomed = [key for key in self.redis.scan_iter(count=1000) if not key.decode().startswith(keep)]
        for start in range(0, len(doomed), 500):
            self.redis.delete(*doomed[start : start + 500])
        connections.close_all()

    def statement_totals(self) -> dict[str, int]:
        statement_counter.flush_now()
        return statement_counter.read_totals(self.redis, STATEMENTS_KEY)

    def start_runs(
        self,
        workflow: str,
        count: int,
        per_second: float | None = None,
        inputs: Callable[[int], dict[str, Any]] | None = None,
        tenants: Sequence[Tenant] = (),
    ) -> list[str]:
        """Start ``count`` runs one after the other, as an integrator's code would (in ``tenants``
        in turn, else the bench's); how long each ``run_start`` took is kept in ``start_seconds``."""
        ids = []
        self.start_seconds: list[float] = []
        began = time.monotonic()
        for number in range(count):
            if per_second:
                delay = began + number / per_second - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            called = time.monotonic()
            given = inputs(number) if inputs else {}
            tenant = tenants[number % len(tenants)] if tenants else self.tenant
            start = run_start(tenant=tenant, workflow=workflow, input=given, actor=ACTOR)
            self.start_seconds.append(time.monotonic() - called)
            ids.append(start.run.id)
        return ids

    def wait_runs(
        self, ids: Sequence[str], timeout: float, processes: ProcessSet | None = None, poll: float = 0.05
    ) -> Waited:
        began = time.monotonic()
        ended: Counter[str] = Counter()  # runs in a final status, by status
        pending = list(ids)
        why = ""
        while True:
            # Runs end roughly in the order they started: each poll asks about the oldest
            # WAIT_CHUNK of those not seen ending yet, and on while those all ended. Asking about
            # every run at each poll cost PostgreSQL and this process about 5 ms per poll for
            # 1,000 runs, taken from the cores the runs are measured on.
            while pending:
                chunk = pending[:WAIT_CHUNK]
                seen = dict(
                    self.monitor.rows(
                        f"SELECT id, status FROM {Run._meta.db_table}"
                        " WHERE id = ANY(%s) AND status = ANY(%s)",
                        [chunk, [RunStatus.SUCCEEDED, *BAD_STATUSES]],
                    )
                )
                ended.update(seen.values())
                pending = [run_id for run_id in chunk if run_id not in seen] + pending[len(chunk) :]
                if len(seen) < len(chunk):
                    break
            if not pending:
                return Waited(dict(ended), len(ids), True, time.monotonic() - began)
            if processes is not None and (dead := processes.dead()):
                why = "process exited: " + ", ".join(
                    f"{p.name} (exit {p.popen.returncode}; {p.log})" for p in dead
                )
                for proc in dead:
                    self.out(log_tail(proc))
                break
            if time.monotonic() - began > timeout:
                why = f"timed out after {timeout:.0f} s"
                break
            time.sleep(poll)
        counts = Counter(ended) + Counter(
            dict(
                self.monitor.rows(
                    f"SELECT status, count(*) FROM {Run._meta.db_table} WHERE id = ANY(%s) GROUP BY status",
                    [pending],
                )
            )
        )
        return Waited(dict(counts), len(ids), False, time.monotonic() - began, why)

    def check_runs(self, label: str, waited: Waited, ids: Sequence[str], resumed_step: str = "") -> None:
        """Bad statuses and retried steps are correctness failures; an unfinished wait is a note.
        ``resumed_step``: a gated step, which runs once to park and once more after its approval."""
        if waited.bad:
            detail = {s: waited.counts[s] for s in BAD_STATUSES if waited.counts.get(s)}
            errors = list(
                Step.objects.filter(run_id__in=ids)
                .exclude(error="")
                .values_list("error", flat=True)
                .distinct()[:3]
            )
            self.problem(
                f"{label}: {waited.bad} of {waited.total} runs did not succeed {detail}; errors: {errors}"
            )
        if not waited.done:
            self.note(f"{label}: {waited.succeeded} of {waited.total} runs succeeded ({waited.why})")
        steps = Step.objects.filter(run_id__in=ids).exclude(key=resumed_step)
        retried = steps.filter(attempt__gt=1).count()
        if retried:
            worst = steps.aggregate(m=Max("attempt"))["m"]
            self.problem(f"{label}: {retried} steps needed more than one attempt (up to {worst})")

    @contextlib.contextmanager
    def runwarden(self, workers: int, threads: int = 0) -> Iterator[ProcessSet]:
        processes = start_runwarden_processes(self.workdir, workers, self.env, threads)
        self.engine = processes.engine
        try:
            missing = wait_for_workers(processes, timeout=self.budget(60))
            if missing:
                raise PhaseSkipped(
                    f"workers did not answer a ping: {', '.join(missing)} (logs in {self.workdir})"
                )
            yield processes
        finally:
            time.sleep(FLUSH_WAIT)  # processes without an exit hook flush their counts every 0.5 s
            processes.stop()

    def warm_up(
        self, processes: ProcessSet, workflow: str = "bench.noop", count: int = WARMUP_RUNS
    ) -> list[str]:
        ids = self.start_runs(workflow, count)
        waited = self.wait_runs(ids, timeout=self.budget(120), processes=processes)
        self.check_runs("warm-up", waited, ids)
        if waited.succeeded < count:
            self.problem(
                f"the pipeline finished {waited.succeeded} of {count} warm-up runs "
                f"({waited.why or 'some failed'}); logs in {self.workdir}"
            )
            raise PhaseSkipped("warm-up did not complete")
        return ids

    # ------------------------------------------------------------------- phases

    def raw_celery(self, workers: int, tasks: int) -> dict[str, Any]:
        """Raw Celery: the same step workers, a no-op task that counts itself in Redis."""
        from bench.tasks import bench_noop_task

        self.need(30, "raw Celery")
        self.prepare()
        key = f"{COUNTER_PREFIX}raw:{uuid.uuid4().hex}"
        processes = start_step_workers(self.workdir, workers, self.env)
        try:
            missing = wait_for_workers(processes, timeout=self.budget(60))
            if missing:
                raise PhaseSkipped(f"workers did not answer a ping: {', '.join(missing)}")
            for _ in range(50):
                bench_noop_task.apply_async(kwargs={"counter_key": key}, queue="read")
            if self._wait_counter(key, 50, self.budget(60)) < 50:
                raise PhaseSkipped(f"the workers did not run 50 warm-up tasks (logs in {self.workdir})")
            self.redis.delete(key)
            cpu0 = cpu_snapshot(processes.pgids(), [])
            began = time.monotonic()
            for _ in range(tasks):
                bench_noop_task.apply_async(kwargs={"counter_key": key}, queue="read")
            done = self._wait_counter(key, tasks, self.budget(120))
            elapsed = time.monotonic() - began
            cpu = cpu_usage(cpu0, cpu_snapshot(processes.pgids(), []))
        finally:
            processes.stop()
            self.redis.delete(key)
        if done < tasks:
            self.note(f"raw Celery, {workers} workers: {done} of {tasks} tasks done in time")
        return {
            "workers": workers,
            "tasks": tasks,
            "done": done,
            "seconds": round(elapsed, 3),
            "tasks_per_s": round(done / elapsed, 1),
            "cpu": cpu,
        }

    def _wait_counter(self, key: str, target: int, timeout: float) -> int:
        began = time.monotonic()
        while (done := int(self.redis.get(key) or 0)) < target and time.monotonic() - began < timeout:
            time.sleep(0.005)
        return done

    def pipeline(
        self,
        workflow: str,
        steps_per_run: int,
        runs: int,
        workers: int,
        threads: int = 0,
        warm_up_runs: int = WARMUP_RUNS,
    ) -> dict[str, Any]:
        """Runs of ``workflow`` started with run_start, timed until all succeeded; every
        transaction (pg_stat_database) and statement (the counter) of every process counted.
        ``threads``: each step worker runs that many steps at once (threads pool), not one."""
        self.need(40, f"{workflow} on {workers} workers")
        self.prepare()
        statements_before = self.statement_totals()
        pg_before, monitor_before, settled = self.monitor.settle_and_read()
        if not settled:
            self.note(
                "another client stayed connected to the bench database: transactions may include its own"
            )
        all_ids: list[str] = []
        result: dict[str, Any] = {"workflow": workflow, "workers": workers, "runs": runs}
        t0 = timezone.now()
        with self.runwarden(workers, threads) as processes:
            all_ids += self.warm_up(processes, workflow, count=warm_up_runs)
            cpu0 = cpu_snapshot(processes.pgids(), self.monitor.backend_pids())
            t0, began = timezone.now(), time.monotonic()
            ids = self.start_runs(workflow, runs)
            all_ids += ids
            started_in = time.monotonic() - began
            waited = self.wait_runs(ids, timeout=self.budget(self.options["max_window"]), processes=processes)
            elapsed = time.monotonic() - began
            cpu = cpu_usage(cpu0, cpu_snapshot(processes.pgids(), self.monitor.backend_pids()))
        connections.close_all()  # its backend exits and flushes its statistics
        pg_after, monitor_after, _ = self.monitor.settle_and_read()
        statements_after = self.statement_totals()
        self.check_runs(f"{workflow} on {workers} workers", waited, ids)
        last = self.monitor.value(
            f"SELECT max(finished_at) FROM {Run._meta.db_table} WHERE id = ANY(%s) AND status = %s",
            [ids, RunStatus.SUCCEEDED],
        )
        if waited.done and last is not None:
            elapsed = max((last - t0).total_seconds(), 1e-3)
        steps = int(
            self.monitor.value(
                f"SELECT count(*) FROM {Step._meta.db_table} WHERE run_id = ANY(%s) AND status = %s",
                [all_ids, StepStatus.SUCCEEDED],
            )
        )
        monitor_queries = monitor_after - monitor_before
        xacts = pg_after["xact_commit"] - pg_before["xact_commit"] - monitor_queries
        by_role: dict[str, dict[str, float]] = {}
        for name in sorted(set(statements_after) | set(statements_before)):
            role, _, kind = name.rpartition(".")
            delta = statements_after.get(name, 0) - statements_before.get(name, 0)
            if delta:
                by_role.setdefault(role, {})[f"{kind}_per_step"] = round(delta / max(steps, 1), 2)

        def total(kind: str) -> int:
            return sum(
                statements_after.get(k, 0) - statements_before.get(k, 0)
                for k in statements_after
                if k.endswith(f".{kind}")
            )

        per_step = max(steps, 1)
        statements, counted, sessions = (
            total("statements"),
            total("transactions"),
            pg_after["sessions"] - pg_before["sessions"],
        )
        from_connections = sessions * self.transactions_per_connection
        result.update(
            engine=self.engine,
            succeeded=waited.succeeded,
            seconds=round(elapsed, 3),
            start_seconds=round(started_in, 3),
            runs_per_s=round(waited.succeeded / elapsed, 1),
            steps_counted=steps,
            pg_transactions=xacts,
            pg_transactions_per_step=round(xacts / per_step, 2),
            pg_transactions_per_run=round(xacts / per_step * steps_per_run, 2),
            pg_statements=statements,
            pg_statements_per_step=round(statements / per_step, 2),
            pg_statements_per_run=round(statements / per_step * steps_per_run, 2),
            pg_sessions=sessions,
            pg_sessions_per_step=round(sessions / per_step, 2),
            pg_autovacuum_runs=pg_after["autovacuum"] - pg_before["autovacuum"],
            monitor_queries_subtracted=monitor_queries,
            # Where the transactions come from: what the processes' Django connections ran (the
            # counter), opening connections, and the rest (connections outside Django, autovacuum).
            transactions_per_step_by_source={
                "django_statements": round(counted / per_step, 2),
                "new_connections": round(from_connections / per_step, 2),
                "elsewhere": round((xacts - counted - from_connections) / per_step, 2),
            },
            by_process=by_role,
            cpu=cpu,
            complete=waited.done,
        )
        return result

    def probe_connection_cost(self) -> float:
        """PostgreSQL transactions that opening one Django connection costs (backend start, and
        Django's SET TIME ZONE when the server's zone name differs from TIME_ZONE)."""
        connections.close_all()
        before, monitor_before, _ = self.monitor.settle_and_read()
        probes = 5
        for _ in range(probes):
            connection.ensure_connection()
            connection.close()
        after, monitor_after, _ = self.monitor.settle_and_read()
        opened = max(after["sessions"] - before["sessions"], 1)
        spent = after["xact_commit"] - before["xact_commit"] - (monitor_after - monitor_before)
        self.transactions_per_connection = round(spent / opened, 2)
        return self.transactions_per_connection

    def dispatch_latency(self, workers: int, per_second: float, seconds: float) -> dict[str, Any]:
        """Runs started at a steady rate; per run, its first step's started_at - run created_at."""
        self.need(seconds + 30, "dispatch latency")
        self.prepare()
        count = max(5, round(per_second * seconds))
        with self.runwarden(workers) as processes:
            self.warm_up(processes)
            began = time.monotonic()
            ids = self.start_runs("bench.noop", count, per_second=per_second)
            achieved = count / max(time.monotonic() - began, 1e-3)
            waited = self.wait_runs(ids, timeout=self.budget(120), processes=processes)
        self.check_runs("dispatch latency", waited, ids)
        pairs = Step.objects.filter(run_id__in=ids, position=0).values_list("started_at", "run__created_at")
        latencies = [(started - created).total_seconds() * 1000 for started, created in pairs if started]
        return {
            "p50": _ms(percentile(latencies, 50)),
            "p99": _ms(percentile(latencies, 99)),
            "max": _ms(max(latencies, default=None)),
            "n": len(latencies),
            "target_rate_per_s": round(per_second, 1),
            "rate_per_s": round(achieved, 1),
        }

    def approvals(self, workers: int, count: int) -> dict[str, Any]:
        """Approve through the HTTP API (in process, as an operator with a token) and time until
        the gated step has finished: its finished_at minus the moment the request was sent."""
        self.need(45, "approve to resume")
        self.prepare()
        token = self._operator_token()
        client = Client(headers={"authorization": f"Bearer {token}"}, HTTP_HOST="127.0.0.1")
        times: list[float] = []
        with self.runwarden(workers) as processes:
            ids = self.start_runs("bench.gated", count)
            gated = Step.objects.filter(run_id__in=ids, key="apply")
            began = time.monotonic()
            while gated.filter(status=StepStatus.WAITING_APPROVAL).count() < count:
                if time.monotonic() - began > self.budget(120) or processes.dead():
                    waited = self.wait_runs(ids, timeout=0)
                    self.check_runs("approve to resume (drafting)", waited, ids, resumed_step="apply")
                    raise PhaseSkipped(
                        f"only {gated.filter(status=StepStatus.WAITING_APPROVAL).count()} of {count} "
                        "gated steps reached waiting_approval"
                    )
                time.sleep(0.05)
            for run_id in ids:
                sent = self._approve_over_api(client, run_id)
                if sent is None:
                    continue
                until = time.monotonic() + self.budget(30)
                while True:
                    status, finished = gated.filter(run_id=run_id).values_list("status", "finished_at").get()
                    if status == StepStatus.SUCCEEDED and finished is not None:
                        times.append((finished - sent).total_seconds() * 1000)
                        break
                    if status in (StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.CONFLICT):
                        self.problem(f"gated step of {run_id} ended {status} after its approval")
                        break
                    if time.monotonic() > until:
                        self.note(f"gated step of {run_id} did not finish after its approval")
                        break
                    time.sleep(0.002)
            waited = self.wait_runs(ids, timeout=self.budget(30), processes=processes)
        self.check_runs("approve to resume", waited, ids, resumed_step="apply")
        return {
            "p50": _ms(percentile(times, 50)),
            "p99": _ms(percentile(times, 99)),
            "max": _ms(max(times, default=None)),
            "n": len(times),
        }

    def _approve_over_api(self, client: Client, run_id: str) -> datetime | None:
        """Approve the run's pending request through the API, as the console's operator would:
        when the POST was sent, or None (a problem recorded) when it could not be."""
        listed = client.get("/api/v1/approvals", {"status": "pending", "run_id": run_id}, secure=True)
        pending = listed.json() if listed.status_code == 200 else []
        if not pending:
            self.problem(f"no pending approval for run {run_id} ({listed.status_code})")
            return None
        approval = pending[0]
        sent = timezone.now()
        answer = client.post(
            f"/api/v1/approvals/{approval['id']}/approve",
            data={"comment": ""},
            content_type="application/json",
            headers={"if-match": f'"{approval["version"]}"'},
            secure=True,
        )
        if answer.status_code != 200:
            self.problem(
                f"approving {approval['id']} answered {answer.status_code}: {answer.content[:200]!r}"
            )
            return None
        return sent

    def _operator_token(self, *tenants: Tenant) -> str:
        user, _ = User.objects.get_or_create(username=OPERATOR)
        for tenant in tenants or (self.tenant,):
            Membership.objects.update_or_create(user=user, tenant=tenant, defaults={"role": Role.OPERATOR})
        user.api_tokens.all().delete()
        return api_token_issue(user=user, name="make bench")

    def real_path(
        self, workers: int, approvals: int, ingest_runs: int, ingest_clients: int
    ) -> dict[str, Any]:
        """The console's real path (bench/http_path.py): a web process (``manage.py serve``,
        DEBUG off, behind a TLS proxy as in production) beside the pipeline's processes, every
        request over HTTP with an API token. Sequential ``GET /api/v1/me`` and ``POST
        /api/v1/runs``; ``approvals`` runs of ``bench.gated_effect`` approved one at a time, each
        timed from sending the approve to its gated step (one effect, 20 ms at the provider)
        finished; then ``ingest_clients`` clients posting ``ingest_runs`` runs across 3 tenants
        with Idempotency-Keys, every 10th request a retry of the previous key."""
        self.need(90, "the API over HTTP")
        self.prepare()
        tenants = [self.tenant, *(bench_tenant(f"{self.tenant.slug}-{n}") for n in (2, 3))]
        token = self._operator_token(*tenants)
        port = free_port()
        env = {**self.env, "DEBUG": "0", "USE_X_FORWARDED_PROTO": "1", "SECRET_KEY": "make-bench"}
        with self.runwarden(workers) as processes:
            processes.add(start_web_process(self.workdir, env, port))
            base = f"http://127.0.0.1:{port}"
            if not wait_for_http(base + "/healthz", timeout=self.budget(30)):
                raise PhaseSkipped(f"the web process did not answer (logs in {self.workdir})")
            client = HttpClient(base, token)
            try:
                latency = http_path.get_and_start_latency(client, self.tenant.slug, 30)
                self.wait_runs(latency["run_ids"], timeout=self.budget(60), processes=processes)
                resumed, approve_ms = self._approve_over_http(client, approvals, processes)
            finally:
                client.close()
            ingest: dict[str, Any] = {}

            def ingest_measured(base: str, clients: int, runs: int, web_processes: int) -> dict[str, Any]:
                figures, tally = http_path.ingest(
                    base, {t.slug: token for t in tenants}, clients, runs, duplicate_every=10
                )
                self._check_ingest(tenants, tally)
                # Drained before the next measurement, which then starts on idle workers.
                accepted = [run_id for ids in tally.answered.values() for run_id in ids]
                waited = self.wait_runs(accepted, timeout=self.budget(120), processes=processes)
                self.check_runs(f"ingest ({clients} clients)", waited, accepted)
                return {**figures, "web_processes": web_processes}

            for web_processes in (1, 2):
                if web_processes > 1:  # WEB_CONCURRENCY=2: two uvicorn processes on one port
                    port = free_port()
                    base = f"http://127.0.0.1:{port}"
                    env_n = {**env, "WEB_CONCURRENCY": str(web_processes)}
                    processes.add(start_web_process(self.workdir, env_n, port))
                    if not wait_for_http(base + "/healthz", timeout=self.budget(30)):
                        self.note(f"{web_processes} web processes did not answer: ingest skipped")
                        break
                ingest[str(web_processes)] = ingest_measured(base, ingest_clients, ingest_runs, web_processes)
                if web_processes == 1:  # the issue's latency goal is set at 16 clients
                    ingest["16_clients"] = ingest_measured(base, 16, max(ingest_runs // 2, 16), 1)
        for tenant in tenants[1:]:  # the extra tenants' runs end here (prepare cleans the bench's)
            for run in Run.objects.filter(tenant=tenant, status__in=UNFINISHED_RUN_STATUSES):
                services.run_cancel(run=run, actor=ACTOR, reason="bench: cleaned up after a phase")
        if latency["bad_statuses"]:
            self.problem(f"the API answered {latency['bad_statuses'][:5]} to sequential requests")
        return {
            "api_latency_ms": {
                "get_p50": latency["get"]["p50"],
                "start_p50": latency["start"]["p50"],
                "approve_p50": http_path.p50_p99(approve_ms)["p50"],
                "get": latency["get"],
                "start": latency["start"],
                "approve": http_path.p50_p99(approve_ms),
            },
            "approve_to_resume_ms": {
                **http_path.p50_p99(resumed),
                "max": _ms(max(resumed, default=None)),
            },
            "ingest": ingest.get("1"),
            "ingest_16_clients": ingest.pop("16_clients", None),
            "ingest_by_web_processes": ingest,
        }

    def _approve_over_http(
        self, client: HttpClient, count: int, processes: ProcessSet
    ) -> tuple[list[float], list[float]]:
        """Approve ``count`` parked ``bench.gated_effect`` runs one at a time over HTTP: (sent →
        gated step finished, the approve request alone), in ms."""
        ids = self.start_runs("bench.gated_effect", count)
        gated = Step.objects.filter(run_id__in=ids, key="send")
        until = time.monotonic() + self.budget(120)
        while gated.filter(status=StepStatus.WAITING_APPROVAL).count() < count:
            if time.monotonic() > until or processes.dead():
                raise PhaseSkipped("the gated runs did not all reach their approval")
            time.sleep(0.05)
        resumed: list[float] = []
        requests: list[float] = []
        for run_id in ids:
            listed = client.call("GET", f"/api/v1/approvals?status=pending&run_id={run_id}")
            if listed.status != 200 or not listed.body:
                self.problem(f"no pending approval for run {run_id} ({listed.status})")
                continue
            approval = listed.body[0]
            sent = timezone.now()
            answer = client.call(
                "POST",
                f"/api/v1/approvals/{approval['id']}/approve",
                {"comment": ""},
                {"If-Match": f'"{approval["version"]}"'},
            )
            if answer.status != 200:
                self.problem(f"approving {approval['id']} answered {answer.status}: {str(answer.body)[:200]}")
                continue
            requests.append(answer.ms)
            deadline = time.monotonic() + self.budget(30)
            while time.monotonic() < deadline:
                status, finished = gated.filter(run_id=run_id).values_list("status", "finished_at").get()
                if status == StepStatus.SUCCEEDED and finished is not None:
                    resumed.append((finished - sent).total_seconds() * 1000)
                    break
                if status in (StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.CONFLICT):
                    self.problem(f"gated step of {run_id} ended {status} after its approval")
                    break
                time.sleep(0.002)
        waited = self.wait_runs(ids, timeout=self.budget(30), processes=processes)
        self.check_runs("approve over HTTP", waited, ids, resumed_step="send")
        effects = SideEffect.objects.filter(step__run_id__in=ids, kind="bench.send").count()
        if effects != len(ids):
            self.problem(f"{effects} effects recorded for {len(ids)} approved runs (one each expected)")
        return resumed, requests

    def _check_ingest(self, tenants: list[Tenant], tally: IngestTally) -> None:
        """Every key accepted made exactly one run, and a retried key was answered with it."""
        twice = [key for key, ids in tally.answered.items() if len(ids) != 1]
        if twice:
            self.problem(f"{len(twice)} Idempotency-Keys were answered with different runs: {twice[:3]}")
        for tenant in tenants:
            keys = {key for slug, key in tally.answered if slug == tenant.slug}
            stored = Run.objects.filter(tenant=tenant, trigger_event_id__in=keys).count()
            if stored != len(keys):
                self.problem(f"{tenant.slug}: {stored} runs stored for {len(keys)} accepted keys")
        unexpected = {s: n for s, n in tally.statuses.items() if s not in (200, 201, 429)}
        if unexpected:
            self.problem(f"ingest answered {unexpected} (only 200, 201 and documented 429s expected)")

    def push_latency(
        self, workers: int, socket_counts: Sequence[int], burst_steps: int, seconds: float, rate: float
    ) -> dict[str, Any]:
        """Consoles watching live pushes (bench/push_clients.py): real websockets to a web
        process (``manage.py serve``, DEBUG off), each a different operator's login session,
        over 3 tenants in turn; the third tenant runs nothing. For each count of sockets, five-
        step runs started at ``rate`` runs/s for ``seconds`` in the other two tenants; then a
        burst: ``burst_steps`` steps (five-step runs started at once) in the first tenant only,
        drained as fast as the workers go, once before any socket is open and once with them
        all. Latency: a frame off the socket minus the ``committed_at`` the writer put in the
        push right after its commit, over every (event, socket) delivered."""
        self.need(60, "push latency")
        self.prepare()
        tenants = [self.tenant, *(bench_tenant(f"{self.tenant.slug}-{n}") for n in (2, 3))]
        busy, burst_tenant = tenants[:2], tenants[0]
        sessions = live_push.console_sessions(tenants, max(socket_counts))
        port = free_port()
        # This process's SECRET_KEY: the sessions made here must be valid there.
        env = {**self.env, "DEBUG": "0", "USE_X_FORWARDED_PROTO": "1"}
        figures: dict[str, Any] = {}
        try:
            with self.runwarden(workers) as processes:
                processes.add(start_web_process(self.workdir, env, port))
                base = f"http://127.0.0.1:{port}"
                if not wait_for_http(base + "/healthz", timeout=self.budget(30)):
                    raise PhaseSkipped(f"the web process did not answer (logs in {self.workdir})")
                self.warm_up(processes)
                quiet = self._push_burst(None, burst_tenant, burst_steps, processes)
                with PushClients(base, sessions) as clients:
                    for count in socket_counts:
                        opened = clients.connect(count)
                        if opened["open"] < count:
                            self.problem(
                                f"push: {opened['open']} of {count} sockets opened: {opened['failed'][:3]}"
                            )
                        ids_before = live_push.last_event_id()
                        ids = self.start_runs("bench.five", max(2, round(rate * seconds)), rate, tenants=busy)
                        waited = self.wait_runs(ids, timeout=self.budget(60), processes=processes)
                        self.check_runs(f"push, {count} sockets", waited, ids)
                        figures[f"sockets_{count}"] = self._push_window(
                            clients, ids_before, f"{count} sockets"
                        )
                    burst = self._push_burst(clients, burst_tenant, burst_steps, processes)
                figures["burst"] = {
                    **burst,
                    "steps_per_s_without_sockets": quiet["steps_per_s"],
                    "cpu_without_sockets": quiet["cpu"],
                }
        finally:
            for tenant in tenants[1:]:  # the extra tenants' runs end here (prepare cleans the bench's)
                for run in Run.objects.filter(tenant=tenant, status__in=UNFINISHED_RUN_STATUSES):
                    services.run_cancel(run=run, actor=ACTOR, reason="bench: cleaned up after a phase")
        return {**figures, "tenants": len(tenants), "rate_runs_per_s": rate, "seconds": seconds}

    def _push_window(self, clients: PushClients, after_id: int, label: str) -> dict[str, Any]:
        """Once every socket has what its tenant committed after ``after_id`` (or 10 s passed):
        the latencies of those events, and the isolation check."""
        upto_id = live_push.last_event_id()
        expected = live_push.events_by_tenant(after_id, upto_id)
        until = time.monotonic() + self.budget(10)
        report = clients.report(after_id, upto_id)
        while not live_push.all_delivered(report, expected) and time.monotonic() < until:
            time.sleep(0.25)
            report = clients.report(after_id, upto_id)
        check = live_push.delivery_check(report, expected)
        if check["foreign"] or check["quiet_sockets_received"]:
            self.problem(
                f"push, {label}: sockets received {check['foreign']} pushes of another tenant, and the "
                f"{check['quiet_sockets']} sockets of tenants that committed nothing "
                f"{check['quiet_sockets_received']}"
            )
        if check["missed"] or check["closed"]:
            self.note(
                f"push, {label}: {check['missed']} pushes never arrived, {check['closed']} sockets closed"
            )
        return {
            "p50": report["p50"],
            "p99": report["p99"],
            "max": report["max"],
            "deliveries": report["deliveries"],
            "events": sum(expected.values()),
            "sockets": len(report["sockets"]),
            **check,
        }

    def _push_burst(
        self, clients: PushClients | None, tenant: Tenant, steps: int, processes: ProcessSet
    ) -> dict[str, Any]:
        """``steps`` steps of five-step runs started at once in ``tenant``; how fast the workers
        drained them, and (with ``clients``) what the sockets got of it."""
        after_id = live_push.last_event_id()
        # CPU by kind of process: on this machine the sockets' work shares the cores with the workers.
        pgids = {p.popen.pid: "web" if p.name == "web" else p.kind for p in processes.procs}
        if clients is not None:
            pgids[clients.process.pid] = "socket clients"
        cpu0 = cpu_snapshot(pgids, self.monitor.backend_pids())
        ids = self.start_runs("bench.five", max(1, steps // 5), tenants=[tenant])
        waited = self.wait_runs(ids, timeout=self.budget(90), processes=processes)
        cpu = cpu_usage(cpu0, cpu_snapshot(pgids, self.monitor.backend_pids()))
        self.check_runs("push burst", waited, ids)
        span = Step.objects.filter(run_id__in=ids).aggregate(
            first=Min("started_at"), last=Max("finished_at"), n=Count("id")
        )
        drained = (span["last"] - span["first"]).total_seconds() if span["first"] and span["last"] else None
        rate = {
            "steps": span["n"],
            "steps_per_s": round(span["n"] / drained, 1) if drained else None,
            # A step records one event as it ends (the last one of its run: run_succeeded).
            "step_events": Event.objects.filter(
                subject__in=[f"run:{run_id}" for run_id in ids], verb__in=["step_succeeded", "run_succeeded"]
            ).count(),
            "cpu": cpu,
        }
        if clients is None:
            return rate
        return {**self._push_window(clients, after_id, "burst"), **rate}

    def agent_io(self, workers: int, slots: int, runs: int, warm_up_runs: int = 2) -> dict[str, Any]:
        """``runs`` one-step runs whose step awaits a 1 s stand-in for a model call, on
        ``workers`` threads-pool step workers with ``slots`` slots in all: how close to the ideal
        (runs x 1 s / slots) they finish, on how many PostgreSQL connections, in how much memory."""
        self.need(40, "agent_io")
        self.prepare()
        per_worker = max(slots // workers, 1)
        connections = PeakCount(  # the sampler's own connection is counted with the rest
            _own_connection,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend'",
            every=0.05,
        )
        with self.runwarden(workers, threads=per_worker) as processes:
            self.warm_up(processes, "bench.agent_io", count=warm_up_runs)
            t0, began = timezone.now(), time.monotonic()
            with connections:
                ids = self.start_runs("bench.agent_io", runs)
                started_in = time.monotonic() - began
                waited = self.wait_runs(ids, timeout=self.budget(120), processes=processes)
                rss = [rss_mb(p.popen.pid) for p in processes.procs if p.kind == "steps"]
        self.check_runs("agent_io", waited, ids)
        last = Run.objects.filter(pk__in=ids, status=RunStatus.SUCCEEDED).aggregate(m=Max("finished_at"))["m"]
        elapsed = (last - t0).total_seconds() if last and waited.done else None
        ideal = max(1.0, runs * 1.0 / (per_worker * workers))
        return {
            "runs": runs,
            "workers": workers,
            "slots": per_worker * workers,
            "succeeded": waited.succeeded,
            "start_ms": _percentile_ms(self.start_seconds),
            "elapsed_s": round(elapsed, 2) if elapsed else None,
            "ideal_s": round(ideal, 2),
            "efficiency": round(ideal / elapsed, 3) if elapsed else None,
            "runs_per_s": round(runs / elapsed, 1) if elapsed else None,
            "start_seconds": round(started_in, 2),
            "max_pg_connections": connections.peak,
            "worker_rss_mb": max((r for r in rss if r is not None), default=None),
        }

    def keyed(self, workers: int, slots: int, runs: int, keys: int, warm_up_runs: int = 2) -> dict[str, Any]:
        """``runs`` runs over ``keys`` entity keys, each step holding its key's lock for 50 ms, on
        ``workers`` threads-pool step workers with ``slots`` slots in all: how close to the ideal
        (runs ÷ keys x 50 ms) they finish, the most steps of one key that ever overlapped (must be
        0), and each key's hand-over: one holder's finish to the next one's start."""
        self.need(40, "keyed")
        self.prepare()
        with self.runwarden(workers, threads=max(slots // workers, 1)) as processes:
            self.warm_up(processes, "bench.keyed", count=warm_up_runs)
            t0 = timezone.now()
            ids = self.start_runs("bench.keyed", runs, inputs=lambda n: {"key": n % keys})
            waited = self.wait_runs(ids, timeout=self.budget(120), processes=processes)
        self.check_runs("keyed", waited, ids)
        # Each key's holders, by when they started: [started_at, finished_at] of its steps.
        held: defaultdict[int, list[tuple[datetime, datetime]]] = defaultdict(list)
        done = Step.objects.filter(run_id__in=ids, status=StepStatus.SUCCEEDED)
        for run_input, started, finished in done.values_list("run__input", "started_at", "finished_at"):
            if started is not None and finished is not None:
                held[run_input["key"]].append((started, finished))
        overlaps, handoffs = 0, []
        for spans in held.values():
            spans.sort()
            for (_, before_end), (after_start, _) in pairwise(spans):
                if after_start < before_end:
                    overlaps += 1
                else:
                    handoffs.append((after_start - before_end).total_seconds())
        last = max((end for spans in held.values() for _, end in spans), default=None)
        elapsed = (last - t0).total_seconds() if last and waited.done else None
        ideal = runs / keys * KEY_HOLD_SECONDS
        return {
            "runs": runs,
            "keys": keys,
            "slots": slots,
            "succeeded": waited.succeeded,
            "elapsed_s": round(elapsed, 2) if elapsed else None,
            "ideal_s": round(ideal, 2),
            "elapsed_over_ideal": round(elapsed / ideal, 2) if elapsed else None,
            "max_overlap": overlaps,
            "key_handoff_ms": _percentile_ms(handoffs),
        }

    def tool_calls(self, workers: int, runs: int, calls: int, cap: int, approvals: int) -> dict[str, Any]:
        """Agents' governed calls (``ctx.tool``) under a tool cap: ``runs`` agent steps of
        ``calls`` calls each (20 ms at the provider) at once, ``bench_tool`` capped at ``cap``
        for the bench's tenant, on ``workers`` threads-pool workers: calls/s against the cap's
        bound (cap ÷ 20 ms), the most calls running at once (sampled from the database; never
        above the cap), their cap waits. Then ``approvals`` calls a human approves mid-step,
        one after the other: the approve POST (the API in process, as an operator with a token)
        → the approved call's record committed by the workers."""
        self.need(60, "tool calls")
        self.prepare()
        quota, _ = TenantQuota.objects.get_or_create(tenant=self.tenant)
        kept = quota.caps
        TenantQuota.objects.filter(pk=quota.pk).update(caps={**(kept or {}), "tool": {BENCH_TOOL: cap}})
        running = PeakCount(
            _own_connection,
            "SELECT count(*) FROM runs_toolcall t JOIN core_lease l ON l.id = t.lease_id"
            " AND l.token = t.lease_token WHERE t.status = 'running'"
            " AND l.released_at IS NULL AND l.expires_at > now()",
            every=0.005,
        )
        try:
            with self.runwarden(workers, threads=50) as processes:
                self.warm_up(processes, "bench.tool_agent", count=2)
                with running:
                    ids = self.start_runs("bench.tool_agent", runs, inputs=lambda n: {"calls": calls})
                    waited = self.wait_runs(ids, timeout=self.budget(120), processes=processes)
                self.check_runs("tool calls", waited, ids)
                made = ToolCall.objects.filter(run_id__in=ids, status=ToolCallStatus.SUCCEEDED)
                span = made.aggregate(first=Min("started_at"), last=Max("finished_at"), n=Count("id"))
                waits = [w / 1000 for w in made.values_list("cap_wait_ms", flat=True) if w is not None]
                approved = self._approved_calls(processes, approvals)
        finally:
            TenantQuota.objects.filter(pk=quota.pk).update(caps=kept)
        elapsed = (span["last"] - span["first"]).total_seconds() if span["first"] and span["last"] else None
        bound = cap / TOOL_CALL_SECONDS
        if running.peak > cap:
            self.problem(f"tool calls: {running.peak} calls ran at once under a cap of {cap}")
        return {
            "runs": runs,
            "calls": span["n"],
            "cap": cap,
            "calls_per_s": round(span["n"] / elapsed, 1) if elapsed else None,
            "cap_bound_per_s": round(bound, 1),
            "of_bound": round(span["n"] / elapsed / bound, 3) if elapsed else None,
            "most_running": running.peak,
            "cap_wait_ms": _percentile_ms(waits),
            "approved_call_ms": approved,
        }

    def _approved_calls(self, processes: ProcessSet, count: int) -> dict[str, Any]:
        token = self._operator_token()
        client = Client(headers={"authorization": f"Bearer {token}"}, HTTP_HOST="127.0.0.1")
        times: list[float] = []
        for run_id in self.start_runs("bench.tool_approval", count):
            until = time.monotonic() + self.budget(30)
            asked = ApprovalRequest.objects.filter(run_id=run_id, status="pending")
            while not asked.exists() and time.monotonic() < until and not processes.dead():
                time.sleep(0.02)
            sent = self._approve_over_api(client, run_id)
            if sent is None:
                continue
            call = ToolCall.objects.filter(run_id=run_id, key="1")
            while time.monotonic() < until:
                status, finished = call.values_list("status", "finished_at").get()
                if status == ToolCallStatus.SUCCEEDED and finished is not None:
                    times.append((finished - sent).total_seconds())
                    break
                time.sleep(0.002)
            else:
                self.note(f"tool calls: the approved call of {run_id} did not finish")
        return {**_percentile_ms(times), "max": _ms(max(times, default=0) * 1000 or None)}

    def start_by_depth(self, depths: Sequence[int], starts: int = 200) -> dict[str, Any]:
        """What a start costs with ``depth`` unfinished runs of its tenant already queued (10 and
        100,000): ``run_start`` in process with no worker running, and the queue-depth check
        alone (a place taken in a transaction rolled back), in ms. A tenant of its own, whose
        runs are cancelled afterwards in one statement."""
        self.need(60, "start cost by queue depth")
        self.prepare()
        tenant, _ = Tenant.objects.get_or_create(slug="bench-depth", defaults={"name": "Bench depth"})
        TenantQuota.objects.update_or_create(tenant=tenant, defaults={"max_queue_depth": 1_000_000})
        figures: dict[str, Any] = {}
        try:
            for depth in sorted(depths):
                queued = Run.objects.filter(tenant=tenant, status=RunStatus.PENDING).count()
                for first in range(queued, depth, 10_000):
                    Run.objects.bulk_create(
                        Run(tenant=tenant, workflow="bench.noop", actor=ACTOR, input={})
                        for _ in range(min(10_000, depth - first))
                    )
                checks: list[float] = []
                for _ in range(starts):
                    began = time.monotonic()
                    with transaction.atomic():
                        queue_place_take(tenant)
                        checks.append(time.monotonic() - began)
                        transaction.set_rollback(True)
                counts: list[float] = []  # what the check counted before the counters
                for _ in range(20):
                    began = time.monotonic()
                    Run.objects.filter(tenant=tenant, status__in=UNFINISHED_RUN_STATUSES).count()
                    counts.append(time.monotonic() - began)
                began_all = time.monotonic()
                ids = []
                started: list[float] = []
                for _ in range(starts):
                    began = time.monotonic()
                    ids.append(run_start(tenant=tenant, workflow="bench.noop", input={}, actor=ACTOR).run.pk)
                    started.append(time.monotonic() - began)
                figures[str(depth)] = {
                    "run_start_ms": _percentile_ms(started),
                    "depth_check_ms": _percentile_ms(checks),
                    "counting_the_runs_ms": _percentile_ms(counts),
                    "starts_per_s": round(starts / (time.monotonic() - began_all), 1),
                }
                Step.objects.filter(run_id__in=ids).update(status=StepStatus.CANCELLED)
                Run.objects.filter(pk__in=ids).update(status=RunStatus.CANCELLED)
        finally:
            Step.objects.filter(tenant=tenant).exclude(status=StepStatus.CANCELLED).update(
                status=StepStatus.CANCELLED
            )
            Run.objects.filter(tenant=tenant, status=RunStatus.PENDING).update(status=RunStatus.CANCELLED)
        return figures

    def backlog(self, workers: int, factor: int) -> dict[str, Any]:
        """factor x the worker slots started at once: all succeed, first attempts only."""
        self.need(40, "backlog")
        self.prepare()
        count = factor * workers  # solo pool: one slot per step worker
        with self.runwarden(workers) as processes:
            self.warm_up(processes, count=2)
            t0 = timezone.now()
            ids = self.start_runs("bench.noop", count)
            started_in = (timezone.now() - t0).total_seconds()
            waited = self.wait_runs(ids, timeout=self.budget(240), processes=processes)
        self.check_runs("backlog", waited, ids)
        steps = Step.objects.filter(run_id__in=ids)
        max_attempt = steps.aggregate(m=Max("attempt"))["m"]
        last = Run.objects.filter(pk__in=ids, status=RunStatus.SUCCEEDED).aggregate(m=Max("finished_at"))["m"]
        return {
            "runs": count,
            "workers": workers,
            "slots": workers,
            "succeeded": waited.succeeded,
            "all_succeeded": waited.succeeded == count,
            "first_attempts_only": waited.succeeded == count and steps.filter(attempt__gt=1).count() == 0,
            "max_attempt": max_attempt,
            "start_seconds": round(started_in, 3),
            "drain_s": round((last - t0).total_seconds(), 3) if last and waited.done else None,
        }


def bench_session(out: Callable[[str], None], options: dict[str, Any]) -> Bench:
    """A Bench on the database and Redis DB of the settings: the bench's workflows imported, its
    statement counter installed, its tenant made, a fresh log folder; the time budget starts now."""
    started = time.monotonic()
    # This process starts the runs (and decides approvals in process) as the web process's
    # request threads do: keeping its connection, preparing its hand-written statements.
    rawsql.prepare_on_this_thread()
    import_module(BENCH_WORKFLOWS_MODULE)
    client = redis.Redis.from_url(settings.REDIS_URL)
    statement_counter.install(settings.REDIS_URL, STATEMENTS_KEY, role="bench")
    modules = [m for m in os.environ.get("RUNWARDEN_WORKFLOW_MODULES", "").split(",") if m.strip()]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "core.settings"),
        "RUNWARDEN_WORKFLOW_MODULES": ",".join(dict.fromkeys([*modules, BENCH_WORKFLOWS_MODULE])),
        statement_counter.ENV_TARGET: f"{settings.REDIS_URL} {STATEMENTS_KEY}",
        "PYTHONUNBUFFERED": "1",
    }
    workdir = Path(settings.BASE_DIR) / "bench" / "logs"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return Bench(
        out=out,
        options=options,
        workdir=workdir,
        redis=client,
        monitor=Monitor(),
        tenant=bench_tenant(),
        env=env,
        deadline=started + options["budget"],
    )


def _own_connection() -> Any:
    """A new connection to the bench's database, for a sampler's thread."""
    return connection.get_new_connection(connection.get_connection_params())


def _percentile_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """``{p50, p99, n}`` in ms of durations in seconds."""
    in_ms = [value * 1000 for value in seconds]
    return {"p50": _ms(percentile(in_ms, 50)), "p99": _ms(percentile(in_ms, 99)), "n": len(in_ms)}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ---------------------------------------------------------------------- reporting


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}{suffix}" if abs(value) < 10 else f"{value:,.1f}{suffix}"
    return f"{value}{suffix}"


def _percentiles(figures: dict[str, Any]) -> str:
    return f"p50 {_fmt(figures.get('p50'))}, p99 {_fmt(figures.get('p99'))}"


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, value, goal) rows of the headline table."""
    latency = r.get("dispatch_latency_ms") or {}
    approvals = r.get("approve_to_resume_ms") or {}
    backlog = r.get("backlog") or {}
    workers = (r.get("config") or {}).get("workers")
    ratio = (
        f"{_fmt(r.get('ratio_vs_celery'))} ({_fmt(r.get('runs_per_s'))} runs/s ÷ "
        f"{_fmt(r.get('celery_tasks_per_s'))} tasks/s, {workers} step worker(s) each"
    )
    pairs = r.get("ratio_pairs") or []
    if len(pairs) > 1:
        ratio += f"; median of {len(pairs)} pairs measured in turn: {', '.join(_fmt(p) for p in pairs)}"
    ratio += ")"
    backlog_text = "n/a"
    if backlog:
        attempts = "first attempts only" if backlog.get("first_attempts_only") else "NOT first attempts only"
        backlog_text = (
            f"{backlog.get('succeeded')} of {backlog.get('runs')} runs on {backlog.get('slots')} slot(s) "
            f"succeeded, {attempts} (max attempt {backlog.get('max_attempt')}), "
            f"drained in {_fmt(backlog.get('drain_s'), ' s')}"
        )
    return [
        ("ratio_vs_celery", ratio, GOALS["ratio_vs_celery"]),
        (
            "pg_transactions_per_step",
            f"{_fmt(r.get('pg_transactions_per_step'))} (one-step runs)",
            GOALS["pg_transactions_per_step"],
        ),
        ("pg_statements_per_step", f"{_fmt(r.get('pg_statements_per_step'))} (one-step runs)", ""),
        ("pg_transactions_per_step_5", f"{_fmt(r.get('pg_transactions_per_step_5'))} (five-step runs)", ""),
        ("pg_statements_per_step_5", f"{_fmt(r.get('pg_statements_per_step_5'))} (five-step runs)", ""),
        (
            "pg_transactions_per_further_step",
            f"{_fmt(r.get('pg_transactions_per_further_step'))} ((five-step run - one-step run) / 4)",
            GOALS["pg_transactions_per_further_step"],
        ),
        (
            "dispatch_latency_ms",
            f"{_percentiles(latency)} ({latency.get('n', 0)} runs started at "
            f"{_fmt(latency.get('rate_per_s'))} runs/s)",
            "",
        ),
        (
            "approve_to_resume_ms",
            f"{_percentiles(approvals)}, max {_fmt(approvals.get('max'))} ({approvals.get('n', 0)} approvals "
            "over HTTP, each resuming a step with one effect)",
            GOALS["approve_to_resume_ms"],
        ),
        (
            "approve_to_resume_inprocess_ms",
            f"{_percentiles(r.get('approve_to_resume_inprocess_ms') or {})} (in process, a no-op gated step)",
            "",
        ),
        ("api_latency_ms", _api_text(r.get("api_latency_ms") or {}), GOALS["api_latency_ms"]),
        ("ingest", _ingest_text(r.get("ingest") or {}), GOALS["ingest"]),
        ("ingest_16_clients", _ingest_text(r.get("ingest_16_clients") or {}), GOALS["ingest_16_clients"]),
        (
            "ingest_by_web_processes",
            _ingest_text((r.get("ingest_by_web_processes") or {}).get("2") or {}),
            "",
        ),
        ("backlog", backlog_text, "all succeed, first attempts only"),
        ("agent_io", _agent_io_text(r.get("agent_io") or {}), GOALS["agent_io"]),
        ("keyed", _keyed_text(r.get("keyed") or {}), GOALS["keyed"]),
        ("tool_calls", _tool_calls_text(r.get("tool_calls") or {}), ""),
        (
            "start_ms",
            f"{_percentiles(r.get('start_ms') or {})} (run_start in-process, as agent_io starts)",
            "",
        ),
        (
            "key_handoff_ms",
            f"{_percentiles(r.get('key_handoff_ms') or {})} (a key's holder finished → its next one started)",
            "",
        ),
        ("start_by_depth", _depth_text(r.get("start_by_depth") or {}), "flat from 10 to 100,000"),
        ("push_latency_ms", _push_text(r.get("push_latency_ms") or {}), GOALS["push_latency_ms"]),
    ]


def _push_text(push: dict[str, Any]) -> str:
    """Commit → delivered per socket count and in the burst, and the isolation check."""
    if not push:
        return "n/a"
    windows = [key for key in push if key.startswith("sockets_")] + ["burst"]
    parts = [
        f"{key.replace('_', ' ')}: {_percentiles(push[key])} ({push[key].get('deliveries')} deliveries)"
        for key in windows
        if push.get(key)
    ]
    burst = push.get("burst") or {}
    foreign = sum((push.get(key) or {}).get("foreign", 0) for key in windows)
    return (
        f"{'; '.join(parts)}; workers {_fmt(burst.get('steps_per_s'))} steps/s in the burst "
        f"({_fmt(burst.get('steps_per_s_without_sockets'))} with no socket open); "
        f"pushes of another tenant received: {foreign}"
    )


def _api_text(api: dict[str, Any]) -> str:
    if not api:
        return "n/a"
    return (
        f"GET /api/v1/me p50 {_fmt(api.get('get_p50'))}, POST /api/v1/runs p50 {_fmt(api.get('start_p50'))}, "
        f"approve p50 {_fmt(api.get('approve_p50'))} (over HTTP, one at a time)"
    )


def _ingest_text(ingest: dict[str, Any]) -> str:
    if not ingest:
        return "n/a"
    return (
        f"{_fmt(ingest.get('runs_per_s'))} runs/s accepted, p50 {_fmt(ingest.get('p50_ms'))} p99 "
        f"{_fmt(ingest.get('p99_ms'))} ms ({ingest.get('clients')} clients, {ingest.get('tenants')} tenants, "
        f"{ingest.get('web_processes')} web process(es); answers {ingest.get('statuses')})"
    )


def _depth_text(by_depth: dict[str, Any]) -> str:
    """run_start and the depth check alone, p50 ms, at each queue depth measured."""
    if not by_depth:
        return "n/a"
    return "; ".join(
        f"{int(depth):,} queued: run_start {_percentiles(got['run_start_ms'])}, "
        f"depth check {_percentiles(got['depth_check_ms'])} "
        f"(counting the runs instead: {_percentiles(got.get('counting_the_runs_ms') or {})})"
        for depth, got in sorted(by_depth.items(), key=lambda item: int(item[0]))
    )


def _keyed_text(keyed: dict[str, Any]) -> str:
    if not keyed:
        return "n/a"
    return (
        f"{keyed.get('succeeded')} of {keyed.get('runs')} runs over {keyed.get('keys')} keys on "
        f"{keyed.get('slots')} slots: {_fmt(keyed.get('elapsed_s'), ' s')} "
        f"(ideal {_fmt(keyed.get('ideal_s'), ' s')}, "
        f"x{_fmt(keyed.get('elapsed_over_ideal'))}), largest overlap on one key {keyed.get('max_overlap')}"
    )


def _tool_calls_text(calls: dict[str, Any]) -> str:
    if not calls:
        return "n/a"
    approved = calls.get("approved_call_ms") or {}
    return (
        f"{calls.get('calls')} calls of {calls.get('runs')} agent steps under a cap of {calls.get('cap')}: "
        f"{_fmt(calls.get('calls_per_s'))} calls/s (the cap's bound {_fmt(calls.get('cap_bound_per_s'))}, "
        f"x{_fmt(calls.get('of_bound'))}), at most {calls.get('most_running')} running at once, cap wait "
        f"{_percentiles(calls.get('cap_wait_ms') or {})}; approved mid-step, approve → call recorded "
        f"{_percentiles(approved)}, max {_fmt(approved.get('max'))} ({approved.get('n', 0)} calls)"
    )


def _agent_io_text(agent: dict[str, Any]) -> str:
    if not agent:
        return "n/a"
    return (
        f"{agent.get('succeeded')} of {agent.get('runs')} runs awaiting 1 s on {agent.get('slots')} slots "
        f"({agent.get('workers')} process(es)): {_fmt(agent.get('elapsed_s'), ' s')} "
        f"(ideal {_fmt(agent.get('ideal_s'), ' s')}, efficiency {_fmt(agent.get('efficiency'))}; "
        f"starting them took {_fmt(agent.get('start_seconds'), ' s')}), "
        f"{agent.get('max_pg_connections')} PostgreSQL connections at most (all processes), "
        f"{_fmt(agent.get('worker_rss_mb'), ' MB')} per worker"
    )


SCALING_HEADER = ("step workers", "raw Celery tasks/s", "Runwarden runs/s", "ratio", "CPU busy", "top CPU")


def scaling_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    scaling = r.get("scaling") or {}
    counts = set(scaling.get("runs_per_s") or {}) | set(scaling.get("celery_tasks_per_s") or {})
    rows: list[tuple[str, ...]] = []
    for n in sorted(counts, key=int):
        cpu = (scaling.get("cpu") or {}).get(n) or {}
        shares = sorted(((k, v) for k, v in cpu.items() if k != "machine_busy_pct"), key=lambda kv: -kv[1])
        top = ", ".join(f"{k} {v:.0f}%" for k, v in shares[:4] if v >= 1)
        rows.append(
            (
                n,
                _fmt((scaling.get("celery_tasks_per_s") or {}).get(n)),
                _fmt((scaling.get("runs_per_s") or {}).get(n)),
                _fmt((scaling.get("ratio") or {}).get(n)),
                _fmt(cpu.get("machine_busy_pct"), "%"),
                top,
            )
        )
    return rows


PROCESS_HEADER = ("runs", "process", "statements/step", "transactions/step", "new connections/step")


def process_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    phases = r.get("phases") or {}
    by_process = r.get("statements_by_process") or {}
    for label, key in (("one-step", "one_step"), ("five-step", "five_step")):
        phase = phases.get(key) or {}
        if key == "one_step":
            phase = phase.get(str((r.get("config") or {}).get("workers")), {})
        for role, figures in sorted((by_process.get(key) or {}).items()):
            rows.append(
                (
                    label,
                    role,
                    _fmt(figures.get("statements_per_step")),
                    _fmt(figures.get("transactions_per_step")),
                    _fmt(figures.get("connections_per_step")),
                )
            )
        if phase:
            rows.append(
                (
                    label,
                    "all processes",
                    _fmt(phase.get("pg_statements_per_step")),
                    _fmt(phase.get("pg_transactions_per_step")),
                    _fmt(phase.get("pg_sessions_per_step")),
                )
            )
    return rows


PROCESS_NOTE = (
    "each process's own figures from the statement counter, transactions as its Django connections "
    "ran them; 'all processes': transactions and new connections from pg_stat_database"
)


def source_lines(r: dict[str, Any]) -> list[str]:
    """Where the transactions of a step come from (see ``Bench.pipeline``)."""
    lines = []
    per_connection = r.get("pg_transactions_per_connection")
    for label, key, total in (
        ("one-step runs", "one_step", r.get("pg_transactions_per_step")),
        ("five-step runs", "five_step", r.get("pg_transactions_per_step_5")),
    ):
        source = (r.get("transactions_per_step_by_source") or {}).get(key)
        if not source or total is None:
            continue
        lines.append(
            f"{label}: {_fmt(total)} transactions per step = {_fmt(source['django_statements'])} run on "
            f"the processes' Django connections + {_fmt(source['new_connections'])} opening new connections "
            f"({_fmt(per_connection)} each: backend start, SET TIME ZONE) + {_fmt(source['elsewhere'])} "
            "elsewhere (connections outside Django, autovacuum)"
        )
    return lines


def machine_line(r: dict[str, Any]) -> str:
    m = r.get("machine") or {}
    return (
        f"{m.get('nproc')} cores ({m.get('cpu')}), {m.get('memory_gb')} GB, {m.get('os')}; "
        f"PostgreSQL {m.get('postgresql')}, Redis {m.get('redis')}, Python {m.get('python')}, "
        f"Django {m.get('django')}, Celery {m.get('celery')}; commit {m.get('commit') or 'n/a'}"
    )


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = ()) -> list[str]:
    """Plain-text table: the columns numbered in ``left`` left-aligned, the others right-aligned."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]


def _correctness(r: dict[str, Any]) -> tuple[bool, list[str]]:
    correctness = r.get("correctness") or {}
    return bool(correctness.get("ok")), list(correctness.get("problems") or [])


def render_text(r: dict[str, Any]) -> str:
    lines = [f"make bench, {r.get('recorded_at')}; engine: {r.get('engine')}", machine_line(r), ""]
    rows = summary_rows(r)
    width = max(len(key) for key, _, _ in rows)
    lines += [f"{key:<{width}}  {value}{f'   [goal: {goal}]' if goal else ''}" for key, value, goal in rows]
    lines += ["", "scaling (one-step runs; CPU in % of one core over the timed window):"]
    lines += ["  " + line for line in _columns(SCALING_HEADER, scaling_rows(r), left=(5,))]
    if (r.get("scaling") or {}).get("limit"):
        lines.append(f"what limits it: {r['scaling']['limit']}")
    if process_rows(r):
        lines += ["", f"per step, by process ({PROCESS_NOTE}):"]
        lines += ["  " + line for line in _columns(PROCESS_HEADER, process_rows(r), left=(0, 1))]
        lines += [f"  {line}" for line in source_lines(r)]
    lines += [f"note: {note}" for note in r.get("notes") or []]
    ok, problems = _correctness(r)
    lines += ["", "correctness: ok" if ok else "correctness: FAILED", *(f"  - {p}" for p in problems)]
    return "\n".join(lines)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int]) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def render_markdown(r: dict[str, Any]) -> str:
    lines = [f"Recorded {r.get('recorded_at')} on {machine_line(r)}.", "", f"Engine: {r.get('engine')}.", ""]
    summary = [(f"`{key}`", value, goal) for key, value, goal in summary_rows(r)]
    lines += _markdown_table(("key", "value", "goal"), summary, right=())
    lines += ["", *_markdown_table(SCALING_HEADER, scaling_rows(r), right=(0, 1, 2, 3, 4))]
    if (r.get("scaling") or {}).get("limit"):
        lines += ["", f"What limits it: {r['scaling']['limit']}"]
    if process_rows(r):
        lines += ["", f"Per step, by process ({PROCESS_NOTE}):", ""]
        lines += [*_markdown_table(PROCESS_HEADER, process_rows(r), right=(2, 3, 4)), ""]
        lines += [f"- {line}" for line in source_lines(r)]
    ok, problems = _correctness(r)
    verdict = (
        "every run succeeded, every step on its first attempt" if ok else "FAILED: " + "; ".join(problems)
    )
    lines += ["", f"Correctness: {verdict}."]
    lines += [f"Note: {note}" for note in r.get("notes") or []]
    return "\n".join(lines)


def limit_sentence(r: dict[str, Any]) -> str:
    """What limits scaling, from the figures measured (CPU of each kind of process)."""
    scaling = r.get("scaling") or {}
    rates = {int(n): v for n, v in scaling.get("runs_per_s", {}).items() if v}
    if not rates:
        return ""
    top, low = max(rates), min(rates)
    cpu = scaling.get("cpu", {}).get(str(top)) or {}
    cores = (r.get("machine") or {}).get("nproc") or 1
    busy = cpu.get("machine_busy_pct") or 0
    ours = sorted(
        ((k, v) for k, v in cpu.items() if k not in ("machine_busy_pct", "other")), key=lambda kv: -kv[1]
    )
    consumers = ", ".join(f"{k} {v:.0f}%" for k, v in ours[:3])
    other = cpu.get("other", 0)
    besides = f"; other programs on the machine took {other:.0f}% of a core" if other >= 10 else ""
    trend = (
        f"runs/s went from {rates[low]:.1f} with {low} step worker(s) to {rates[top]:.1f} with {top} "
        f"(×{rates[top] / rates[low]:.2f})"
        if top != low
        else f"{rates[top]:.1f} runs/s with {top} step worker(s)"
    )
    engine = cpu.get("engine", 0)
    if busy >= 85:
        return (
            f"CPU. With {top} step workers the {cores} cores were {busy:.0f}% busy ({consumers} of one core"
            f"{besides}); {trend}: past the core count, more worker processes only share the same cores."
        )
    if engine >= 85:
        return (
            f"the engine's own process: it used {engine:.0f}% of one core with {top} step workers while the "
            f"machine was {busy:.0f}% busy ({consumers}{besides}); {trend}."
        )
    return (
        f"not CPU ({busy:.0f}% busy with {top} step workers: {consumers} of one core{besides}): each step "
        f"waits on round trips to PostgreSQL and Redis and between dispatch rounds; {trend}."
    )


# ------------------------------------------------------------------------ command


class Command(BaseCommand):
    help = (
        "Benchmark Runwarden against raw Celery on real worker processes and write bench/results.json "
        "(see docs/BENCHMARKS.md). Needs DATABASE_URL (PostgreSQL) and REDIS_URL of their own."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workers", type=int, default=1, help="step workers for the headline ratio")
        parser.add_argument("--runs", type=int, default=300, help="one-step runs per throughput measurement")
        parser.add_argument(
            "--pairs",
            type=int,
            default=5,
            help="raw Celery / Runwarden measurements taken in turn for the headline ratio (its median)",
        )
        parser.add_argument("--five-runs", type=int, default=60, help="five-step runs")
        parser.add_argument("--tasks", type=int, default=2000, help="raw Celery tasks per measurement")
        parser.add_argument("--approvals", type=int, default=20)
        parser.add_argument(
            "--ingest-runs", type=int, default=600, help="runs posted over HTTP by the ingest clients"
        )
        parser.add_argument(
            "--ingest-clients", type=int, default=32, help="concurrent HTTP clients of ingest"
        )
        parser.add_argument("--latency-seconds", type=float, default=10.0)
        parser.add_argument("--backlog-factor", type=int, default=20, help="backlog = factor x worker slots")
        parser.add_argument("--scaling", default="1,2,4", help="step worker counts to measure")
        parser.add_argument("--agent-runs", type=int, default=300, help="agent_io: runs awaiting 1 s each")
        parser.add_argument("--agent-slots", type=int, default=100, help="agent_io: slots in all")
        parser.add_argument("--keyed-runs", type=int, default=200, help="keyed: runs over 10 entity keys")
        parser.add_argument("--tool-runs", type=int, default=40, help="tool_calls: agent steps at once")
        parser.add_argument("--tool-calls", type=int, default=5, help="tool_calls: governed calls per step")
        parser.add_argument("--tool-cap", type=int, default=4, help="tool_calls: the tool's cap")
        parser.add_argument(
            "--tool-approvals", type=int, default=10, help="tool_calls: calls approved mid-step"
        )
        parser.add_argument(
            "--depth-runs", type=int, default=100_000, help="start_by_depth: the deep queue's unfinished runs"
        )
        parser.add_argument(
            "--agent-workers", type=int, default=2, help="agent_io: threads-pool step workers"
        )
        parser.add_argument(
            "--push-sockets",
            type=_counts,
            default=[100, 500],
            help="push_latency: websockets open at each measurement (comma-separated)",
        )
        parser.add_argument(
            "--push-burst-steps", type=int, default=1000, help="push_latency: steps of the burst"
        )
        parser.add_argument(
            "--push-seconds", type=float, default=4.0, help="push_latency: seconds of runs per socket count"
        )
        parser.add_argument(
            "--push-rate", type=float, default=10.0, help="push_latency: five-step runs/s started meanwhile"
        )
        parser.add_argument("--push-workers", type=int, default=2, help="push_latency: step workers")
        parser.add_argument(
            "--only",
            type=_phase_names,
            default=[],
            help=f"run only these phases (comma-separated): {', '.join(PHASES)}",
        )
        parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole bench")
        parser.add_argument(
            "--max-window", type=float, default=90.0, help="seconds a throughput measurement may last"
        )
        parser.add_argument("--output", default="bench/results.json")
        parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
        parser.add_argument(
            "--report", metavar="FILE", help="only print the table of an earlier results file"
        )
        parser.add_argument("--any-database", action="store_true", help="run on a database not named *bench*")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["report"]:
            results = json.loads(Path(options["report"]).read_text())
            self.stdout.write(render_markdown(results) if options["markdown"] else render_text(results))
            return
        if connection.vendor != "postgresql" or not settings.REDIS_URL:
            raise CommandError("bench needs DATABASE_URL (PostgreSQL) and REDIS_URL (use `make bench`)")
        if "bench" not in str(connection.settings_dict["NAME"]) and not options["any_database"]:
            raise CommandError(
                "bench cancels unfinished runs and empties the Redis DB of REDIS_URL between phases: "
                "run it on a database of its own (its name containing 'bench', as `make bench` does) "
                "or pass --any-database"
            )
        scaling = sorted(
            {int(n) for n in str(options["scaling"]).split(",") if n.strip()} | {options["workers"]}
        )
        if min(scaling) < 1:
            raise CommandError("worker counts must be at least 1")

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

        def interrupted(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in previous:
            signal.signal(sig, interrupted)
        try:
            results = self._run(options, scaling)
        except KeyboardInterrupt:
            stop_all_started()
            raise CommandError("interrupted; every process the bench started was stopped") from None
        finally:
            stop_all_started()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        output = Path(options["output"])
        if not output.is_absolute():
            output = Path(settings.BASE_DIR) / output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")
        self.stdout.write("")
        self.stdout.write(render_markdown(results) if options["markdown"] else render_text(results))
        self.stdout.write(f"\nwritten: {output}")
        if not results["correctness"]["ok"]:
            self.stderr.write(
                "\nCORRECTNESS FAILURE (not a slow machine): " + "; ".join(results["correctness"]["problems"])
            )
            raise SystemExit(1)

    def _run(self, options: dict[str, Any], scaling: list[int]) -> dict[str, Any]:
        started = time.monotonic()
        bench = bench_session(self.stdout.write, options)
        monitor, client = bench.monitor, bench.redis
        results: dict[str, Any] = {
            "schema": 1,
            "recorded_at": timezone.now().replace(microsecond=0).isoformat(),
            "machine": machine_info(monitor, client),
            "pg_transactions_per_connection": bench.probe_connection_cost(),
            "config": {
                k: options[k]
                for k in (
                    "workers",
                    "runs",
                    "pairs",
                    "five_runs",
                    "tasks",
                    "approvals",
                    "ingest_runs",
                    "ingest_clients",
                    "latency_seconds",
                    "backlog_factor",
                    "agent_runs",
                    "agent_slots",
                    "agent_workers",
                    "keyed_runs",
                    "tool_runs",
                    "tool_calls",
                    "tool_cap",
                    "tool_approvals",
                    "depth_runs",
                    "push_sockets",
                    "push_burst_steps",
                    "push_seconds",
                    "push_rate",
                    "push_workers",
                    "only",
                    "budget",
                    "max_window",
                )
            }
            | {"scaling": scaling},
        }
        phases: dict[str, Any] = {}
        workers = options["workers"]
        raw: dict[int, dict[str, Any]] = {}
        ours: dict[int, dict[str, Any]] = {}

        def phase(label: str, run: Callable[[], Any]) -> Any:
            self.stdout.write(f"[{time.monotonic() - started:5.0f} s] {label} ...")
            try:
                value = run()
            except PhaseSkipped as skipped:
                bench.note(f"{label}: {skipped}")
                return None
            self.stdout.write(f"    {_brief(value)}")
            return value

        def measure_pair(n: int) -> None:
            got = phase(
                f"raw Celery, {n} step worker(s), {options['tasks']} no-op tasks",
                lambda: bench.raw_celery(n, options["tasks"]),
            )
            if got:
                raw[n] = got
            got = phase(
                f"Runwarden, {n} step worker(s), {options['runs']} one-step runs",
                lambda: bench.pipeline("bench.noop", 1, options["runs"], n),
            )
            if got:
                ours[n] = got

        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        ratio_pairs: list[float] = []
        only = set(options["only"])
        try:
            # The headline ratio: raw Celery and Runwarden in turn, several times, and the pair
            # of the median ratio kept, since this machine's speed drifts from minute to minute.
            for _ in range(max(options["pairs"], 1) if not only or "ratio" in only else 0):
                raw.pop(workers, None)
                ours.pop(workers, None)
                measure_pair(workers)
                if workers in raw and workers in ours and raw[workers]["tasks_per_s"]:
                    pairs.append((raw[workers], ours[workers]))
            ratio_pairs = [round(o["runs_per_s"] / c["tasks_per_s"], 3) for c, o in pairs]  # in turn
            if pairs:
                median = sorted(pairs, key=lambda pair: pair[1]["runs_per_s"] / pair[0]["tasks_per_s"])
                raw[workers], ours[workers] = median[len(pairs) // 2]
            throughput = (ours.get(workers) or {}).get("runs_per_s") or 10.0
            push_sockets = options["push_sockets"]
            measured: list[tuple[str, str, Callable[[], Any]]] = [
                (
                    "five_step",
                    f"Runwarden, {workers} step worker(s), {options['five_runs']} five-step runs",
                    lambda: bench.pipeline("bench.five", 5, options["five_runs"], workers),
                ),
                (
                    "dispatch_latency",
                    f"dispatch latency at {throughput / 2:.1f} runs/s for {options['latency_seconds']:.0f} s",
                    lambda: bench.dispatch_latency(workers, throughput / 2, options["latency_seconds"]),
                ),
                (
                    "approvals",
                    f"approve to resume in process, {options['approvals']} approvals",
                    lambda: bench.approvals(workers, options["approvals"]),
                ),
                (
                    "real_path",
                    f"the API over HTTP: latency, {options['approvals']} approvals with an effect, "
                    f"ingest of {options['ingest_runs']} runs from {options['ingest_clients']} clients",
                    lambda: bench.real_path(
                        workers, options["approvals"], options["ingest_runs"], options["ingest_clients"]
                    ),
                ),
                (
                    "push_latency",
                    f"live pushes to {', '.join(map(str, push_sockets))} websockets over 3 tenants, "
                    f"then a burst of {options['push_burst_steps']} steps",
                    lambda: bench.push_latency(
                        options["push_workers"],
                        push_sockets,
                        options["push_burst_steps"],
                        options["push_seconds"],
                        options["push_rate"],
                    ),
                ),
                (
                    "agent_io",
                    f"agent_io: {options['agent_runs']} runs awaiting 1 s, {options['agent_slots']} slots "
                    f"on {options['agent_workers']} threads-pool worker(s)",
                    lambda: bench.agent_io(
                        options["agent_workers"], options["agent_slots"], options["agent_runs"]
                    ),
                ),
                (
                    "keyed",
                    f"keyed: {options['keyed_runs']} runs over 10 keys, 50 ms under the key's lock, 20 slots",
                    lambda: bench.keyed(options["agent_workers"], 20, options["keyed_runs"], 10),
                ),
                (
                    "tool_calls",
                    f"tool calls: {options['tool_runs']} agent steps x {options['tool_calls']} "
                    f"governed calls under a cap of {options['tool_cap']}, "
                    f"then {options['tool_approvals']} calls approved mid-step",
                    lambda: bench.tool_calls(
                        options["agent_workers"],
                        options["tool_runs"],
                        options["tool_calls"],
                        options["tool_cap"],
                        options["tool_approvals"],
                    ),
                ),
                (
                    "start_by_depth",
                    "start cost with 10 and 100,000 unfinished runs queued",
                    lambda: bench.start_by_depth([10, options["depth_runs"]]),
                ),
                (
                    "backlog",
                    f"backlog, {options['backlog_factor']} x {workers} slot(s) at once",
                    lambda: bench.backlog(workers, options["backlog_factor"]),
                ),
            ]
            for name, label, run in measured:
                if not only or name in only:
                    phases[name] = phase(label, run)
            for n in scaling if not only or "scaling" in only else []:
                if n != workers:
                    measure_pair(n)
        finally:
            monitor.close()
            client.close()

        one, five = ours.get(workers) or {}, phases.get("five_step") or {}
        base = (raw.get(workers) or {}).get("tasks_per_s")
        results.update(
            engine=bench.engine,
            ratio_vs_celery=round(one["runs_per_s"] / base, 3) if one and base else None,
            ratio_pairs=ratio_pairs,
            runs_per_s=one.get("runs_per_s"),
            celery_tasks_per_s=base,
            pg_transactions_per_step=one.get("pg_transactions_per_step"),
            pg_statements_per_step=one.get("pg_statements_per_step"),
            pg_transactions_per_step_5=five.get("pg_transactions_per_step"),
            pg_statements_per_step_5=five.get("pg_statements_per_step"),
            pg_transactions_per_further_step=_further(one, five, "pg_transactions_per_run"),
            pg_statements_per_further_step=_further(one, five, "pg_statements_per_run"),
            dispatch_latency_ms=phases.get("dispatch_latency"),
            approve_to_resume_ms=(phases.get("real_path") or {}).get("approve_to_resume_ms"),
            approve_to_resume_inprocess_ms=phases.get("approvals"),
            api_latency_ms=(phases.get("real_path") or {}).get("api_latency_ms"),
            ingest=(phases.get("real_path") or {}).get("ingest"),
            ingest_16_clients=(phases.get("real_path") or {}).get("ingest_16_clients"),
            ingest_by_web_processes=(phases.get("real_path") or {}).get("ingest_by_web_processes"),
            backlog=phases.get("backlog"),
            agent_io=phases.get("agent_io"),
            keyed=phases.get("keyed"),
            tool_calls=phases.get("tool_calls"),
            start_ms=(phases.get("agent_io") or {}).get("start_ms"),
            key_handoff_ms=(phases.get("keyed") or {}).get("key_handoff_ms"),
            start_by_depth=phases.get("start_by_depth"),
            push_latency_ms=phases.get("push_latency"),
            scaling={
                "runs_per_s": {str(n): v["runs_per_s"] for n, v in sorted(ours.items())},
                "celery_tasks_per_s": {str(n): v["tasks_per_s"] for n, v in sorted(raw.items())},
                "ratio": {
                    str(n): round(ours[n]["runs_per_s"] / raw[n]["tasks_per_s"], 3)
                    for n in sorted(ours)
                    if n in raw and raw[n]["tasks_per_s"]
                },
                "cpu": {str(n): v["cpu"] for n, v in sorted(ours.items())},
                "celery_cpu": {str(n): v["cpu"] for n, v in sorted(raw.items())},
            },
            transactions_per_step_by_source={
                "one_step": one.get("transactions_per_step_by_source"),
                "five_step": five.get("transactions_per_step_by_source"),
            },
            statements_by_process={
                "one_step": one.get("by_process", {}),
                "five_step": five.get("by_process", {}),
            },
            phases={
                "raw_celery": {str(n): v for n, v in raw.items()},
                "one_step": {str(n): v for n, v in ours.items()},
                "five_step": five,
            },
            seconds=round(time.monotonic() - started, 1),
        )
        results["scaling"]["limit"] = limit_sentence(results)
        results["notes"] = bench.notes
        results["correctness"] = {"ok": not bench.problems, "problems": bench.problems}
        return results


PHASES = (
    "ratio",
    "five_step",
    "dispatch_latency",
    "approvals",
    "real_path",
    "push_latency",
    "agent_io",
    "keyed",
    "tool_calls",
    "start_by_depth",
    "backlog",
    "scaling",
)


def _counts(text: str) -> list[int]:
    counts = sorted({int(n) for n in text.split(",") if n.strip()})
    if not counts or counts[0] < 1:
        raise ValueError(text)
    return counts


def _phase_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = set(names) - set(PHASES)
    if unknown:
        raise CommandError(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    return names


def _further(one: dict[str, Any], five: dict[str, Any], key: str) -> float | None:
    if not one.get(key) or not five.get(key):
        return None
    return round((five[key] - one[key]) / 4, 2)


def _brief(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    keys = (
        "tasks_per_s",
        "runs_per_s",
        "pg_transactions_per_step",
        "pg_statements_per_step",
        "p50",
        "p99",
        "n",
        "rate_per_s",
        "succeeded",
        "first_attempts_only",
        "max_attempt",
        "drain_s",
        "seconds",
    )
    if "burst" in value:  # push_latency
        return _push_text(value)
    return ", ".join(f"{k}={value[k]}" for k in keys if k in value)
