"""/metrics: the design's names with values from the database, and every name docs/operations.md
documents present from a process's start, in both modes (one process; every process of the
host adding up through PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from approvals.models import ConflictKind
from approvals.services import record_conflict
from core import metrics
from core.models import Tenant
from runs.definitions import LANES
from runs.services import run_start
from tests.conftest import make_tenant
from tests.servers import base_env, console_server, database_url, manage

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# Labelled metrics whose label values nobody knows before the first observation: an effect's
# kind is whatever a workflow names in ``ctx.effect``. They are listed (HELP, TYPE) without a
# sample until then.
OPEN_LABELS = {"runwarden_effect_latency_seconds"}


def documented_metrics() -> dict[str, list[str]]:
    """Each metric name in docs/operations.md's "Metrics and logs", with its documented labels."""
    section = OPERATIONS.read_text().split("## Metrics and logs", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"`(runwarden_[a-z_]+)(?:\{([a-z_,]+)\})?`", section)
    assert found, "docs/operations.md documents no metric"
    return {name: labels.split(",") if labels else [] for name, labels in found}


def assert_every_documented_metric_present(text: str) -> None:
    missing = []
    for name, labels in documented_metrics().items():
        if f"# TYPE {name} " not in text:
            missing.append(f"{name}: not listed")
            continue
        if name in OPEN_LABELS:
            continue
        samples = re.findall(rf"^{name}(?:_bucket|_count|_sum)?(?:\{{([^}}]*)\}})? \S+$", text, re.MULTILINE)
        if not samples:
            missing.append(f"{name}: no sample")
        for found in samples:
            names = sorted(part.split("=", 1)[0] for part in found.split(",") if part and "le=" not in part)
            if names != sorted(labels):
                missing.append(f"{name}: labels {names}, documented {sorted(labels)}")
                break
    assert not missing, "\n".join(missing) + "\n\n" + text


def assert_known_labels_at_zero(text: str, tenant: str) -> None:
    expected = [
        *(f'runwarden_duplicates_suppressed_total{{kind="{kind}"}} 0.0' for kind in metrics.DUPLICATE_KINDS),
        *(
            f'runwarden_approval_decisions_total{{outcome="{outcome}"}} 0.0'
            for outcome in metrics.APPROVAL_OUTCOMES
        ),
        *(f'runwarden_conflicts_open{{kind="{kind}"}} 0.0' for kind in ConflictKind.values),
        *(f'runwarden_queue_depth{{lane="{lane}",tenant="{tenant}"}} 0.0' for lane in LANES),
        'runwarden_inflight_steps{workflow="demo.crm_update"} 0.0',
        "runwarden_lock_conflicts_total 0.0",
        "runwarden_retries_blocked_by_lease_total 0.0",
        "runwarden_lock_wait_seconds_count 0.0",
    ]
    lines = set(text.splitlines())
    absent = [sample for sample in expected if sample not in lines]
    assert not absent, "\n".join(absent)


@pytest.mark.django_db
def test_metrics_expose_designs_names_with_values_from_the_database(acme: Tenant) -> None:
    run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t")
    record_conflict("duplicate_trigger_payload", tenant_id=acme.pk, target_key="trigger:x")
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert 'runwarden_queue_depth{lane="read",tenant="acme"} 1.0' in text
    assert 'runwarden_conflicts_open{kind="duplicate_trigger_payload"} 1.0' in text
    assert 'runwarden_conflicts_open{kind="stale_approval"} 0.0' in text, "the other kinds at 0"
    for name in [
        "runwarden_lock_wait_seconds",
        "runwarden_lock_conflicts_total",
        "runwarden_duplicates_suppressed_total",
        "runwarden_retries_blocked_by_lease_total",
        "runwarden_effect_latency_seconds",
        "runwarden_approval_decisions_total",
        "runwarden_inflight_steps",
    ]:
        assert f"# HELP {name}" in text, name


@pytest.mark.both_dialects
@pytest.mark.django_db
def test_every_documented_metric_is_on_metrics_in_one_process(acme: Tenant) -> None:
    """The test process itself (no PROMETHEUS_MULTIPROC_DIR); on SQLite too, as the embedded
    default serves /metrics. Counters may have moved in earlier tests: presence is the point."""
    text = Client().get("/metrics").content.decode()
    assert_every_documented_metric_present(text)
    for line in ('runwarden_queue_depth{lane="draft",tenant="acme"} 0.0', "runwarden_lock_conflicts_total"):
        assert line in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["embedded", "procfile"])
def test_every_documented_metric_is_on_metrics_from_a_fresh_start(
    mode: str, transactional_db: None, tmp_path: Path
) -> None:
    """A web process just started, nothing counted yet: every documented name is there, each
    labelled counter at 0 for every label it can take. Both modes: the embedded default (SQLite,
    no Redis, one process's counters) and the Procfile's (PostgreSQL, Redis, every process
    writing into a shared PROMETHEUS_MULTIPROC_DIR)."""
    if mode == "embedded":
        env = base_env(DEBUG="1", SQLITE_PATH=str(tmp_path / "embedded.sqlite3"))
        for name in ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR"):
            env.pop(name, None)
        manage("migrate", "--noinput", env=env)
        manage("seed_demo", env=env)
    else:
        make_tenant("acme", "Acme Corp")
        (tmp_path / "prometheus").mkdir()
        env = base_env(
            DEBUG="1",
            DATABASE_URL=database_url(),
            REDIS_URL=settings.REDIS_URL,
            PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        )
    with (
        console_server(env, tmp_path / "serve.log") as url,
        urllib.request.urlopen(url + "/metrics", timeout=10) as response,
    ):
        text = response.read().decode()
    assert_every_documented_metric_present(text)
    assert_known_labels_at_zero(text, "acme")
