"""make bench: Runwarden's pipeline against raw Celery, side by side, on the same broker.

Both sides run on real worker processes started here. Reported as ratios, since this
machine's speed drifts: our runs/s over raw Celery's tasks/s, and PostgreSQL transactions
per completed step (from pg_stat_database, including the dispatcher, reaper and beat).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from core.models import Tenant, TenantQuota
from runs.models import Run, RunStatus
from runs.services import run_start
from runs.tasks import bench_noop_task

QUEUES = ["celery", "read", "draft", "external", "high_risk", "maintenance"]


class Command(BaseCommand):
    help = "Benchmark: Runwarden runs/s vs raw Celery tasks/s on the same broker, and transactions per step."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--runs", type=int, default=300)
        parser.add_argument("--tasks", type=int, default=1000)

    def handle(self, *args: Any, runs: int, tasks: int, **options: Any) -> None:
        if connection.vendor != "postgresql" or not settings.REDIS_URL:
            raise CommandError("bench needs DATABASE_URL (PostgreSQL) and REDIS_URL")
        client = redis.Redis.from_url(settings.REDIS_URL)
        client.delete(*QUEUES, "unacked", "unacked_index")
        tenant, _ = Tenant.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
        TenantQuota.objects.update_or_create(
            tenant=tenant, defaults={"max_concurrent_steps": 50, "max_queue_depth": 1_000_000}
        )
        Run.objects.filter(tenant=tenant).exclude(status=RunStatus.SUCCEEDED).update(
            status=RunStatus.CANCELLED
        )
        workdir = Path(tempfile.mkdtemp(prefix="runwarden-bench-"))
        processes = [
            self._celery(
                ["worker", "-n", "steps@%h", "-Q", "celery,read", "--pool", "solo"], workdir / "steps.log"
            ),
            self._celery(
                ["worker", "-n", "maint@%h", "-Q", "maintenance", "--pool", "solo"], workdir / "maint.log"
            ),
            self._celery(["beat", "--schedule", str(workdir / "beat")], workdir / "beat.log"),
        ]
        try:
            time.sleep(4)  # workers up
            raw_rate = self._raw_celery(client, tasks)
            ours_rate, xacts_per_step = self._pipeline(tenant, runs)
        finally:
            for process in processes:
                os.killpg(process.pid, signal.SIGTERM)
            for process in processes:
                process.wait(30)
            client.close()
        self.stdout.write("")
        self.stdout.write(
            f"raw Celery (1 solo worker, Redis broker): {tasks} no-op tasks, {raw_rate:8.1f} tasks/s"
        )
        self.stdout.write(
            f"Runwarden pipeline (same worker + 1 maintenance worker): {runs} one-step runs, "
            f"{ours_rate:8.1f} runs/s"
        )
        self.stdout.write(f"ratio, Runwarden / raw Celery: {ours_rate / raw_rate:.2f}")
        self.stdout.write(f"PostgreSQL transactions per completed step (all processes): {xacts_per_step:.1f}")

    def _celery(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "core.settings"}
        common = ["--loglevel", "WARNING"] + (
            ["--without-heartbeat", "--without-mingle", "--without-gossip"] if args[0] == "worker" else []
        )
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "core", *args, *common],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def _raw_celery(self, client: redis.Redis, tasks: int) -> float:
        key = f"bench:{uuid.uuid4()}"
        started = time.monotonic()
        for _ in range(tasks):
            bench_noop_task.apply_async(kwargs={"counter_key": key}, queue="read")
        while int(client.get(key) or 0) < tasks:
            if time.monotonic() - started > 600:
                raise CommandError("raw Celery tasks did not finish in 10 minutes")
            time.sleep(0.05)
        return tasks / (time.monotonic() - started)

    def _xacts(self) -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            return int(cursor.fetchone()[0])

    def _pipeline(self, tenant: Tenant, runs: int) -> tuple[float, float]:
        before = self._xacts()
        started = time.monotonic()
        ids = [
            run_start(tenant=tenant, workflow="bench.noop", input={}, actor="bench").run.id
            for _ in range(runs)
        ]
        while Run.objects.filter(pk__in=ids, status=RunStatus.SUCCEEDED).count() < runs:
            if time.monotonic() - started > 600:
                raise CommandError("bench runs did not finish in 10 minutes")
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # let pg_stat catch up
        return runs / elapsed, (self._xacts() - before) / runs
