from __future__ import annotations

import pytest
from django.test import Client

from approvals.services import record_conflict
from core.models import Tenant
from runs.services import run_start

pytestmark = pytest.mark.django_db


def test_metrics_expose_designs_names_with_values_from_the_database(acme: Tenant) -> None:
    run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t")
    record_conflict("duplicate_trigger_payload", tenant_id=acme.pk, target_key="trigger:x")
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert 'runwarden_queue_depth{lane="read",tenant="acme"} 1.0' in text
    assert 'runwarden_conflicts_open{kind="duplicate_trigger_payload"} 1.0' in text
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
