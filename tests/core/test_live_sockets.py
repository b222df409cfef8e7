"""Live pushes over real websockets: a web process (``manage.py serve``), a real worker running
the steps, and 20 logged-in consoles over two tenants (the push bench's own clients, fewer)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from bench.live_push import console_sessions, last_event_id
from bench.push_clients import PushClients
from core.models import Event, Tenant
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.dialects import REAL_WORKERS
from tests.runs.cluster import Cluster, finished, wait_for
from tests.servers import base_env, console_server, database_url

SOCKETS = 20


def _received_all(clients: PushClients, after_id: int, tenant: Tenant, wanted: set[int]) -> dict[str, Any]:
    """The sockets' report once each socket of ``tenant`` has ``wanted`` (or 10 s passed)."""
    deadline = time.monotonic() + 10
    while True:
        report = clients.report(after_id, 10**12, ids=True)
        mine = [s for s in report["sockets"] if s["tenant_id"] == tenant.pk]
        if all(wanted <= set(s["ids"]) for s in mine) or time.monotonic() > deadline:
            return report


def _run_and_check_pushes(clients: PushClients, tenant: Tenant, other: Tenant, cluster: Cluster) -> None:
    after_id = last_event_id()
    run = run_start(tenant=tenant, workflow="bench.five", input={}, actor="t").run
    wait_for(lambda: finished([run.id]), 60, cluster.logs)
    assert Run.objects.get(pk=run.id).status == RunStatus.SUCCEEDED, cluster.logs()
    wanted = set(Event.objects.filter(tenant=tenant, id__gt=after_id).values_list("id", flat=True))
    assert len(wanted) >= 6  # created, then one per step
    report = _received_all(clients, after_id, tenant, wanted)
    theirs = [s for s in report["sockets"] if s["tenant_id"] == tenant.pk]
    others = [s for s in report["sockets"] if s["tenant_id"] == other.pk]
    assert len(theirs) == len(others) == SOCKETS // 2
    assert [set(s["ids"]) for s in theirs] == [wanted] * len(theirs)
    assert [s["ids"] for s in others] == [[]] * len(others)
    assert sum(s["foreign"] for s in report["sockets"]) == 0
    assert [s["closed"] for s in report["sockets"]] == [""] * SOCKETS


@REAL_WORKERS
@pytest.mark.timeout(120)
def test_every_console_of_the_runs_tenant_gets_its_events_and_no_other_tenants_console_gets_any(
    acme: Tenant, globex: Tenant, cluster: Cluster, tmp_path: Path
) -> None:
    env = base_env(
        DEBUG="1",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
    )
    cluster.worker("w1")
    cluster.dispatcher()
    sessions = console_sessions([acme, globex], SOCKETS)
    with console_server(env, tmp_path / "web.log") as base, PushClients(base, sessions) as clients:
        assert clients.connect(SOCKETS) == {"open": SOCKETS, "failed": []}
        _run_and_check_pushes(clients, acme, globex, cluster)
        # Afterwards, the other way round: a run still finishes, and its pushes stay in its tenant.
        _run_and_check_pushes(clients, globex, acme, cluster)
