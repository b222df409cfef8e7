"""What every engine driver of ``make bench-peers`` shares: workloads, processes, results."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".peers"  # the peers' own virtualenv and npm packages (ignored by git)
LOG_DIR = ROOT / "bench" / "logs" / "peers"
PG_ADMIN_URL = os.environ.get("PEERS_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    runs: int
    slots: int  # concurrent steps in all, over at most STEP_PROCESSES processes
    keys: int = 0
    hold_seconds: float = 0.0
    wait_seconds: float = 0.0
    ideal_s: float = 0.0


STEP_PROCESSES = 2
WORKLOADS: dict[str, Workload] = {
    "noop": Workload("noop", runs=1000, slots=8),
    "keyed": Workload("keyed", runs=200, slots=20, keys=10, hold_seconds=0.05, ideal_s=1.0),
    "agent_io": Workload("agent_io", runs=300, slots=100, wait_seconds=1.0, ideal_s=3.0),
    "signal": Workload("signal", runs=20, slots=8),
}
WARM_UP_RUNS = 10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--runs", type=int, default=0, help="override the workload's run count")
    return parser.parse_args(argv)


def workload_from(args: argparse.Namespace) -> Workload:
    base = WORKLOADS[args.workload]
    if args.runs:
        return Workload(**{**base.__dict__, "runs": args.runs})
    return base


def emit(result: Mapping[str, Any]) -> None:
    """The driver's answer: its last line of stdout."""
    print("PEER_RESULT " + json.dumps(dict(result), sort_keys=True), flush=True)


def failed_result(engine: str, workload: Workload, error: BaseException) -> dict[str, Any]:
    """The result line of a driver whose measurement raised: it still comes, saying what."""
    return {
        "engine": engine,
        "workload": workload.name,
        "ok": False,
        "runs": workload.runs,
        "finished": 0,
        "elapsed_s": None,
        "notes": f"failed: {type(error).__name__}: {error}",
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    p50, p99 = percentile(seconds, 50), percentile(seconds, 99)
    return {
        "p50": None if p50 is None else round(p50 * 1000, 1),
        "p99": None if p99 is None else round(p99 * 1000, 1),
    }


def max_overlap(intervals_by_key: Mapping[Any, Sequence[tuple[float, float]]]) -> int:
    """The most bodies beyond the first that ran at once on one key (0: never overlapped)."""
    worst = 0
    for intervals in intervals_by_key.values():
        edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
        running = 0
        for _, step in edges:  # an end sorts before a start at the same instant
            running += step
            worst = max(worst, running - 1)
    return worst


# ---------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    kind: str  # "steps" (step-executing) | "engine" (server, dispatcher)
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Procs:
    procs: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        kind: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Proc:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = LOG_DIR / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        proc = Proc(name, kind, popen, log)
        self.procs.append(proc)
        return proc

    def cpu_seconds(self) -> dict[str, float]:
        """CPU (user + system) of every live process in each group so far, by kind."""
        totals: dict[str, float] = {}
        for proc in self.procs:
            totals[proc.kind] = totals.get(proc.kind, 0.0) + _group_cpu(proc.popen.pid)
        return {kind: round(value, 2) for kind, value in totals.items()}

    def dead(self) -> list[str]:
        return [p.name for p in self.procs if p.popen.poll() is not None]

    def stop(self, grace_seconds: float = 10.0) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
        self.procs.clear()


@contextlib.contextmanager
def processes() -> Iterator[Procs]:
    procs = Procs()
    try:
        yield procs
    finally:
        procs.stop()


def _group_cpu(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (and their reaped
    children's, as /proc counts them)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) != pgid:  # fields[2] is pgrp (stat's 5th field)
            continue
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        total += (utime + stime + cutime + cstime) / CLOCK_TICKS
    return total


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    def open_() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((host, port)) == 0

    wait_until(open_, timeout, interval=0.1, what=f"{host}:{port}")


def wait_for_http(url: str, timeout: float) -> bool:
    """Whether ``url`` answered 200 within ``timeout`` seconds."""

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    try:
        wait_until(answers, timeout, interval=0.2, what=url)
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------- PostgreSQL


def fresh_database(name: str) -> str:
    """Drop and create database ``name``; its URL."""
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


class PeakCount:
    """The highest value a ``SELECT count(*) ...`` reached while the block ran: sampled every
    ``every`` seconds on a thread, on a connection ``connect`` opens for it."""

    def __init__(
        self, connect: Callable[[], Any], sql: str, params: Sequence[Any] = (), *, every: float
    ) -> None:
        self.connect, self.sql, self.params, self.every, self.peak = connect, sql, list(params), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                while True:
                    cursor.execute(self.sql, self.params)
                    self.peak = max(self.peak, int(cursor.fetchone()[0]))
                    if self._stop.wait(self.every):
                        return
        finally:
            conn.close()


def connection_sampler(database: str) -> PeakCount:
    """The most connections to one database seen at once, sampled every 50 ms (from a
    connection to the ``postgres`` database, so not counted itself)."""
    return PeakCount(
        lambda: psycopg2.connect(PG_ADMIN_URL),
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
        [database],
        every=0.05,
    )
