"""The console's real path for ``manage.py bench``: HTTP requests to a ``manage.py serve`` web
process (as an integrator's client or the browser sends them), with the Procfile's processes
running the steps. Plain ``http.client`` over loopback, one keep-alive connection per client
thread, an API token per operator.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.peers.common import percentile


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]
    ms: float


# uvicorn closes a keep-alive connection idle for 5 s: one idle longer is opened again before a
# request rather than found closed by it (the request would be lost, not refused).
IDLE_RECONNECT_SECONDS = 4.0


class HttpClient:
    """One keep-alive connection to the web process, as one client (not shared between threads)."""

    def __init__(self, base: str, token: str) -> None:
        parts = urlsplit(base)
        self._connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        self._last_answer = time.monotonic()
        # The web process sits behind a TLS-terminating proxy in production; say so, as one does.
        self._headers = {"Authorization": f"Bearer {token}", "X-Forwarded-Proto": "https"}

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
        payload = json.dumps(body) if body is not None else None
        sent = {
            **self._headers,
            **({"Content-Type": "application/json"} if payload else {}),
            **(headers or {}),
        }
        if time.monotonic() - self._last_answer > IDLE_RECONNECT_SECONDS:
            self._connection.close()  # the next request connects afresh
        began = time.perf_counter()
        self._connection.request(method, path, body=payload, headers=sent)
        response = self._connection.getresponse()
        raw = response.read()
        ms = (time.perf_counter() - began) * 1000
        self._last_answer = time.monotonic()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw[:200]
        return Answer(response.status, decoded, {k.lower(): v for k, v in response.getheaders()}, ms)

    def close(self) -> None:
        self._connection.close()


def p50_p99(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": _round(percentile(values, 50)),
        "p99": _round(percentile(values, 99)),
        "n": len(values),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def get_and_start_latency(client: HttpClient, tenant: str, samples: int) -> dict[str, Any]:
    """Sequential, on an idle pipeline: ``GET /api/v1/me`` and ``POST /api/v1/runs`` (one no-op run)."""
    for _ in range(5):  # warm: the first requests open the request thread's connection
        client.call("GET", "/api/v1/me")
    gets = [client.call("GET", "/api/v1/me") for _ in range(samples)]
    starts = [
        client.call("POST", "/api/v1/runs", {"tenant": tenant, "workflow": "bench.noop", "input": {}})
        for _ in range(samples)
    ]
    bad = [a.status for a in gets if a.status != 200] + [a.status for a in starts if a.status != 201]
    return {
        "get": p50_p99([a.ms for a in gets]),
        "start": p50_p99([a.ms for a in starts]),
        "bad_statuses": bad,
        "run_ids": [a.body["id"] for a in starts if a.status == 201],
    }


@dataclass
class IngestTally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    # (tenant, key) -> the run ids answered for it: one id each, however often it was sent
    answered: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def ingest(
    base: str, tokens: dict[str, str], clients: int, runs: int, duplicate_every: int
) -> tuple[dict[str, Any], IngestTally]:
    """``clients`` threads, each with its own connection, post ``runs`` runs in all across the
    tenants of ``tokens`` (tenant slug -> an operator's token), each with an Idempotency-Key;
    every ``duplicate_every``-th request of a client sends its previous key again (a client
    retrying after a lost answer). Returns the figures and the tally to check."""
    tally = IngestTally()
    tenants = sorted(tokens)
    per_client = max(runs // clients, 1)

    def client_loop(number: int) -> None:
        tenant = tenants[number % len(tenants)]
        client = HttpClient(base, tokens[tenant])
        previous = ""
        try:
            for i in range(per_client):
                again = bool(previous) and duplicate_every > 0 and i % duplicate_every == duplicate_every - 1
                key = previous if again else f"ingest-{number}-{i}-{uuid.uuid4().hex[:8]}"
                answer = client.call(
                    "POST",
                    "/api/v1/runs",
                    {"tenant": tenant, "workflow": "bench.noop", "input": {}},
                    {"Idempotency-Key": key},
                )
                with tally.lock:
                    tally.latencies.append(answer.ms)
                    tally.statuses[answer.status] += 1
                    if answer.status in (200, 201):
                        tally.answered.setdefault((tenant, key), set()).add(answer.body["id"])
                previous = key
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - began
    accepted = len(tally.answered)
    figures = {
        "clients": clients,
        "tenants": len(tenants),
        "requests": sum(tally.statuses.values()),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "runs_accepted": accepted,
        "runs_per_s": round(accepted / elapsed, 1) if elapsed else None,
        "requests_per_s": round(sum(tally.statuses.values()) / elapsed, 1) if elapsed else None,
        "p50_ms": _round(percentile(tally.latencies, 50)),
        "p99_ms": _round(percentile(tally.latencies, 99)),
        "elapsed_s": round(elapsed, 2),
    }
    return figures, tally
