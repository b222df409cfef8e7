"""/metrics on the web process adds up every process's counters (prometheus multiprocess mode):
a real worker's effect latency and the dispatcher's lock waits appear on the web's /metrics."""

from __future__ import annotations

import re
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from core import tallies
from core.models import Tenant
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.runs.cluster import Cluster, wait_for
from tests.servers import base_env, console_server, database_url


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(180)
def test_a_workers_counters_appear_on_the_webs_metrics(
    sandbox_acme: Tenant, transactional_db: None, tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    cluster = Cluster(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(shared))
    web_env = base_env(
        DEBUG="1",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        PROMETHEUS_MULTIPROC_DIR=str(shared),
    )
    try:
        with console_server(web_env, tmp_path / "serve.log") as web:
            cluster.worker("w1")
            cluster.beat()
            runs = [
                run_start(
                    tenant=sandbox_acme,
                    workflow="demo.crm_update",
                    input={"contact_id": 1, "changes": {"stage": f"s{n}"}},
                    actor="t",
                ).run
                for n in range(3)
            ]
            wait_for(
                lambda: (
                    Run.objects.filter(pk__in=[r.id for r in runs], status=RunStatus.SUCCEEDED).count() == 3
                ),
                90,
                cluster.logs,
            )
            text = _metrics(web)
    finally:
        cluster.stop()
    # The web process ran no step: these come from the worker's and the dispatcher's files.
    assert _value(text, 'runwarden_effect_latency_seconds_count{kind="crm.update_contact"}') == 3, text[
        -3000:
    ]
    assert _value(text, "runwarden_lock_wait_seconds_count") >= 3, "each crm update waited for its lock"
    # Three updates of one contact queued behind each other: some waited measurably.
    assert _value(text, "runwarden_lock_wait_seconds_sum") > 0
    assert "runwarden_queue_depth" in text, "the database gauges are still there"
    # The same waits, per tenant, in the database the overview reads.
    last_hour = tallies.tallies_since([sandbox_acme.pk], timezone.now() - timedelta(hours=1))
    waits = tallies.lock_wait_summary(last_hour)
    assert waits["n"] >= 3, "each crm update's lock wait is in its tenant's tally"
