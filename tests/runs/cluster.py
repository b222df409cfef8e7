"""Real Celery worker and beat processes against the test database, for execution tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis
from django.conf import settings

from core.models import Tenant
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.servers import ROOT, base_env, database_url, free_port

QUEUES = ["celery", "read", "draft", "external", "high_risk", "maintenance"]
# Also forget worker pools announced by an earlier test's (killed) workers, and wake-ups.
STATE_KEYS = ["runwarden:worker-pools", "runwarden:dispatcher:wake"]


def purge_queues(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(*QUEUES, *STATE_KEYS, "unacked", "unacked_index", "unacked_mutex")
    finally:
        client.close()


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    message: str | Callable[[], str],
    interval: float = 0.1,
) -> None:
    """Check ``predicate()`` every ``interval`` seconds until it holds; after ``timeout`` seconds,
    fail with ``message`` (a callable is called only then, e.g. to read a log as it is by then)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message() if callable(message) else message}")
        time.sleep(interval)


def database_sessions() -> str:
    """The test database's other sessions: state, what they wait on and for whom, their query."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, application_name, state, wait_event_type, wait_event, pg_blocking_pids(pid),"
            " round(extract(epoch FROM now() - xact_start)::numeric, 1), left(query, 200)"
            " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        rows = cursor.fetchall()
    return "\n".join(" | ".join(str(value) for value in row) for row in rows) or "(none)"


def finished(run_ids: list[str]) -> bool:
    """Every run of ``run_ids`` has ended: succeeded, failed, cancelled or in conflict."""
    return (
        not Run.objects.filter(pk__in=run_ids)
        .exclude(status__in=[RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CONFLICT])
        .exists()
    )


def crm_runs(tenant: Tenant, n: int) -> list[str]:
    """Start ``n`` CRM updates spread over contacts 1-10 (so some wait for a contact's lock)."""
    return [
        run_start(
            tenant=tenant,
            workflow="demo.crm_update",
            input={"contact_id": 1 + i % 10, "changes": {"stage": f"s{i}"}},
            actor="t",
        ).run.id
        for i in range(n)
    ]


@contextmanager
def private_redis() -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A Redis of this test's own on a free loopback port, and a way to stop and start it."""
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is needed for this test"
    port = free_port()
    args = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    state: dict[str, subprocess.Popen[bytes]] = {}

    def answers() -> bool:
        return subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0

    def set_running(running: bool) -> None:
        if running:
            state["server"] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(answers, 10, "redis up")
        else:
            state["server"].terminate()
            state["server"].wait(10)

    set_running(True)
    try:
        yield f"redis://127.0.0.1:{port}/0", set_running
    finally:
        if state["server"].poll() is None:
            state["server"].terminate()
            state["server"].wait(10)


def calls_per_key(operation: str) -> list[int]:
    """How often the sandbox was called for each idempotency key of ``operation``."""
    from django.db.models import Count

    from demo.models import SandboxCall

    rows = SandboxCall.objects.filter(operation=operation).values("idempotency_key").annotate(n=Count("id"))
    return [row["n"] for row in rows]


class Cluster:
    """Starts worker and beat processes; always stops them (by process group)."""

    def __init__(self, tmp_path: Path, *, redis_url: str | None = None, **env: str) -> None:
        self.redis_url = redis_url or settings.REDIS_URL
        defaults = {
            "DEBUG": "1",
            "DATABASE_URL": database_url(),
            "REDIS_URL": self.redis_url,
            "RUNWARDEN_WORKFLOW_MODULES": "tests.runs.workflows_for_tests",
            "RUNWARDEN_DEFAULT_LEASE_SECONDS": "2",
            "RUNWARDEN_SANDBOX_LATENCY_MS": "20",
        }
        self.env = base_env(**{**defaults, **env})
        self.tmp_path = tmp_path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        purge_queues(self.redis_url)

    def _start(
        self, name: str, args: list[str], command: list[str] | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        # A second process under one name would escape stop() and outlive the test.
        assert name not in self.processes, f"a process named {name!r} is already running"
        log = (self.tmp_path / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [*(command or [sys.executable, "-m", "celery", "-A", "core"]), *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def worker(
        self,
        name: str,
        queues: list[str] | None = None,
        concurrency: int = 1,
        pool: str = "",
        **env: str,
    ) -> subprocess.Popen[bytes]:
        """A Celery worker: ``pool`` solo (one slot) or prefork by default, or threads (many
        steps in one process); ``env`` on top of the cluster's, for this process only."""
        return self._start(
            name,
            [
                "worker",
                "--hostname", f"{name}@%h",
                "--queues", ",".join(queues or QUEUES),
                "--pool", pool or ("solo" if concurrency == 1 else "prefork"),
                "--concurrency", str(concurrency),
                "--without-heartbeat", "--without-mingle", "--without-gossip",
                "--loglevel", "INFO",
            ],
            env=env,
        )  # fmt: skip

    def dispatcher(self, name: str = "dispatcher") -> subprocess.Popen[bytes]:
        return self._start(name, ["dispatcher"], command=[sys.executable, "manage.py"])

    def beat(self, name: str = "beat", *, with_dispatcher: bool = True) -> subprocess.Popen[bytes]:
        """Beat (outbox, approval timeouts) and the dispatcher: the cluster's maintenance."""
        if with_dispatcher:
            self.dispatcher()
        return self._start(
            name, ["beat", "--schedule", str(self.tmp_path / f"{name}-schedule"), "--loglevel", "INFO"]
        )

    def logs(self) -> str:
        """Each process's log, with what a hang needs to be read after the fact: every Celery
        process's thread stacks (Celery logs them on SIGUSR1) and the database's sessions."""
        self._log_worker_stacks()
        return "\n".join(
            [f"--- {p.name}\n{p.read_text()[-12000:]}" for p in sorted(self.tmp_path.glob("*.log"))]
            + [f"--- database sessions\n{database_sessions()}"]
        )

    def _log_worker_stacks(self) -> None:
        celery = [p for p in self.processes.values() if "worker" in p.args and p.poll() is None]
        for process in celery:
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR1)
        if celery:
            time.sleep(0.5)  # the handler writes when the process next runs Python

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)
        purge_queues(self.redis_url)
