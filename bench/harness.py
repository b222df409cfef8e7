"""The machinery of ``manage.py bench``: processes, the monitor connection, CPU accounting.

Nothing here is used by the product; it lives in ``runs`` beside the command that uses it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import get_commands
from django.db import connection

from core.models import Tenant, TenantQuota

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# The queues the step workers consume: the lanes the bench workflows use, plus Celery's default.
STEP_QUEUES = "celery,read,draft"
WORKER_FLAGS = ["--pool", "solo", "--without-heartbeat", "--without-mingle", "--without-gossip"]


BENCH_TENANT_SLUG = "bench"


def bench_tenant(slug: str = BENCH_TENANT_SLUG) -> Tenant:
    """The tenant every bench runs in (or another of the bench's, by ``slug``), with caps that
    never hold a measurement back."""
    tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": f"Bench ({slug})"})
    TenantQuota.objects.update_or_create(
        tenant=tenant, defaults={"max_concurrent_steps": 1000, "max_queue_depth": 1_000_000}
    )
    return tenant


# ---------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str  # e.g. steps1, dispatcher
    kind: str  # steps (step workers) | engine (Runwarden's own: dispatcher, or maintenance worker + beat)
    popen: subprocess.Popen[bytes]
    log: Path
    hostname: str = ""  # Celery workers: the node name to ping


_LIVE: list[Proc] = []  # every process started and not yet stopped (for emergency cleanup)


@dataclass
class ProcessSet:
    procs: list[Proc] = field(default_factory=list)
    engine: str = ""  # how Runwarden's own processes were run

    def add(self, proc: Proc) -> None:
        self.procs.append(proc)

    def pgids(self) -> dict[int, str]:
        """Process group id -> kind (every process was started in a group of its own)."""
        return {p.popen.pid: p.kind for p in self.procs}

    def worker_hostnames(self) -> list[str]:
        return [p.hostname for p in self.procs if p.hostname]

    def dead(self) -> list[Proc]:
        return [p for p in self.procs if p.popen.poll() is not None]

    def stop(self, grace_seconds: float = 15.0) -> None:
        stop_processes(self.procs, grace_seconds)


def stop_processes(procs: Iterable[Proc], grace_seconds: float = 15.0) -> None:
    """SIGTERM every process group, wait, then SIGKILL what is left. Never raises."""
    procs = list(procs)
    for proc in procs:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
    for proc in procs:
        # The leader may be gone while a child of its group lives on: kill the group anyway.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        with contextlib.suppress(ValueError):
            _LIVE.remove(proc)


def stop_all_started() -> None:
    """Stop whatever is still running (atexit, signal handlers)."""
    stop_processes(list(_LIVE), grace_seconds=5)


def _spawn(
    name: str, kind: str, argv: list[str], workdir: Path, env: Mapping[str, str], hostname: str = ""
) -> Proc:
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            cwd=settings.BASE_DIR,
            env={**env, "RUNWARDEN_PROCESS_ROLE": name.rstrip("0123456789")},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
        )
    proc = Proc(name=name, kind=kind, popen=popen, log=log, hostname=hostname)
    _LIVE.append(proc)
    return proc


def _celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "core", *args, "--loglevel", "WARNING"]


def start_step_workers(
    workdir: Path, step_workers: int, env: Mapping[str, str], threads: int = 0
) -> ProcessSet:
    """N step-executing workers, one solo-pool process each, on the step queues. Both sides of
    the comparison (raw Celery and Runwarden) run exactly these. ``threads``: each runs that
    many steps at once on Celery's threads pool instead (the waiting lanes' shape)."""
    processes = ProcessSet()
    flags = WORKER_FLAGS
    if threads:
        flags = ["--pool", "threads", "--concurrency", str(threads), *WORKER_FLAGS[2:]]
    for number in range(1, step_workers + 1):
        node = f"bench-steps{number}@{platform.node()}"
        argv = _celery("worker", "-n", node, "-Q", STEP_QUEUES, *flags)
        processes.add(_spawn(f"steps{number}", "steps", argv, workdir, env, hostname=node))
    return processes


def has_dispatcher_command() -> bool:
    return "dispatcher" in get_commands()


def start_runwarden_processes(
    workdir: Path, step_workers: int, env: Mapping[str, str], threads: int = 0
) -> ProcessSet:
    """Runwarden's processes: N step workers, then the engine's own process(es).

    With a ``dispatcher`` management command: ``python manage.py dispatcher``. Without one (the
    engine before issue 8): a maintenance worker (dispatch, reap) and beat, which ticks them.
    The engine's own processes are Runwarden's cost, not step-executing workers.
    """
    processes = start_step_workers(workdir, step_workers, env, threads)
    if has_dispatcher_command():
        processes.engine = "dispatcher process (manage.py dispatcher)"
        argv = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "dispatcher"]
        processes.add(_spawn("dispatcher", "engine", argv, workdir, env))
    else:
        processes.engine = "maintenance worker + beat (no dispatcher command)"
        node = f"bench-maint@{platform.node()}"
        argv = _celery("worker", "-n", node, "-Q", "maintenance", *WORKER_FLAGS)
        processes.add(_spawn("maintenance", "engine", argv, workdir, env, hostname=node))
        schedule = str(workdir / "beat-schedule")
        processes.add(_spawn("beat", "engine", _celery("beat", "--schedule", schedule), workdir, env))
    return processes


def start_web_process(workdir: Path, env: Mapping[str, str], port: int) -> Proc:
    """One web process (``manage.py serve``), as the Procfile starts it, on ``port``."""
    argv = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "serve", "--port", str(port)]
    return _spawn("web", "engine", argv, workdir, env)


def wait_for_workers(processes: ProcessSet, timeout: float) -> list[str]:
    """Ping the Celery workers until every one answers; returns those that did not."""
    from core.celery import app

    expected = set(processes.worker_hostnames())
    deadline = time.monotonic() + timeout
    while expected and time.monotonic() < deadline:
        if processes.dead():
            break
        replies = app.control.ping(destination=sorted(expected), timeout=0.5) or []
        for reply in replies:
            expected -= set(reply)
    return sorted(expected)


def log_tail(proc: Proc, lines: int = 15) -> str:
    try:
        text = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# ------------------------------------------------------------------------ the monitor


class Monitor:
    """A raw connection of the bench's own, outside Django (so the statement counter does not
    see it), for polling and for reading ``pg_stat_database``.

    Every query it sends is one transaction that PostgreSQL counts like any other, so the bench
    subtracts them. ``pg_stat_force_next_flush()`` (PostgreSQL 15+) makes each one reach the
    shared statistics before its answer comes back, so that subtraction is exact.
    """

    def __init__(self) -> None:
        self.conn: Any = connection.get_new_connection(connection.get_connection_params())
        self.conn.autocommit = True
        self.queries = 0
        with self.conn.cursor() as cursor:
            cursor.execute("SHOW server_version_num")
            self.server_version_num = int(cursor.fetchone()[0])
        self.queries += 1
        self.prefix = "SELECT pg_stat_force_next_flush(); " if self.server_version_num >= 150000 else ""

    def rows(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cursor:
            self.queries += 1
            cursor.execute(self.prefix + sql, params)
            return list(cursor.fetchall())

    def value(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
        found = self.rows(sql, params)
        return found[0][0] if found else None

    def other_backends(self) -> list[int]:
        return [
            row[0]
            for row in self.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        ]

    def backend_pids(self) -> list[int]:
        """Every client backend of this database, this monitor's own included."""
        return [
            row[0]
            for row in self.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend'"
            )
        ]

    def settle_and_read(self, timeout: float = 20.0) -> tuple[dict[str, int], int, bool]:
        """Wait until no other client is connected to this database (a backend flushes its
        pending statistics when it exits), then read the database's counters: ``xact_commit``,
        ``sessions`` (connections opened) and ``autovacuum`` (autovacuum and autoanalyze runs
        on its tables, whose transactions PostgreSQL counts in ``xact_commit`` too).

        Returns (counters, how many of this monitor's queries came before this read, settled).
        """
        deadline = time.monotonic() + timeout
        settled = False
        while time.monotonic() < deadline:
            if not self.other_backends():
                settled = True
                break
            time.sleep(0.05)
        before_read = self.queries
        sessions = "d.sessions" if self.server_version_num >= 140000 else "0"
        autovacuum = "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_user_tables"
        row = self.rows(
            f"SELECT d.xact_commit, {sessions}, ({autovacuum}) "
            "FROM pg_stat_database d WHERE d.datname = current_database()"
        )[0]
        counters = {"xact_commit": int(row[0]), "sessions": int(row[1]), "autovacuum": int(row[2])}
        return counters, before_read, settled

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


# ---------------------------------------------------------------------------- CPU


@dataclass
class CpuSnapshot:
    at: float
    machine_busy: int
    machine_total: int
    by_pid: dict[int, tuple[str, int]]  # pid -> (category, utime + stime ticks)


def _read_machine() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def cpu_snapshot(pgids: Mapping[int, str], pg_bench_backends: Iterable[int]) -> CpuSnapshot:
    """CPU ticks per process, sorted into: steps (step workers), engine (Runwarden's own
    processes), bench (this process), postgres-bench (backends of the bench database),
    postgres-other, redis. The rest of the machine's busy time is ``other``."""
    backends = set(pg_bench_backends)
    me = os.getpid()
    by_pid: dict[int, tuple[str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                raw = stat.read()
        except OSError:
            continue
        comm = raw[raw.find("(") + 1 : raw.rfind(")")]
        rest = raw[raw.rfind(")") + 2 :].split()
        pgrp, ticks = int(rest[2]), int(rest[11]) + int(rest[12])
        if pid == me:
            category = "bench"
        elif pgrp in pgids:
            category = pgids[pgrp]
        elif pid in backends:
            category = "postgres-bench"
        elif comm == "postgres":
            category = "postgres-other"
        elif comm.startswith("redis-server"):
            category = "redis"
        else:
            continue
        by_pid[pid] = (category, ticks)
    busy, total = _read_machine()
    return CpuSnapshot(at=time.monotonic(), machine_busy=busy, machine_total=total, by_pid=by_pid)


def cpu_usage(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float]:
    """Per category, % of one core over the window; ``machine_busy_pct`` is % of all cores."""
    elapsed = max(end.at - start.at, 1e-6)
    shares: dict[str, float] = {}
    for pid, (category, ticks) in end.by_pid.items():
        before = start.by_pid.get(pid)
        used = ticks - (before[1] if before else 0)
        shares[category] = shares.get(category, 0.0) + max(used, 0)
    cores = os.cpu_count() or 1
    usage = {name: round(100 * ticks / CLOCK_TICKS / elapsed, 1) for name, ticks in shares.items()}
    busy_ticks = end.machine_busy - start.machine_busy
    total_ticks = max(end.machine_total - start.machine_total, 1)
    usage["machine_busy_pct"] = round(100 * busy_ticks / total_ticks, 1)
    accounted = sum(v for k, v in usage.items() if k != "machine_busy_pct")
    usage["other"] = round(max(usage["machine_busy_pct"] * cores - accounted, 0.0), 1)
    return usage


# ---------------------------------------------------------------------------- machine


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, cwd=settings.BASE_DIR)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def machine_info(monitor: Monitor, redis_client: Any) -> dict[str, Any]:
    import celery
    import django

    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu_model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), ""
        )
    memory_gb = 0.0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        memory_gb = round(int(meminfo.readline().split()[1]) / 1024 / 1024, 1)
    redis_info = redis_client.info("server")
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_first_line(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "memory_gb": memory_gb,
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]) or platform.platform(),
        "postgresql": str(monitor.value("SHOW server_version")),
        "redis": str(redis_info.get("redis_version", "")),
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "commit": f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else "",
    }


def rss_mb(pid: int) -> float | None:
    """A process's resident memory, in MB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
