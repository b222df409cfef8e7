"""Logs: JSON lines in production, and every line about a step carries its fields — in this
process and in a real worker process."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from core.logs import JsonFormatter, StepContextFilter, step_context
from core.models import Tenant
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.runs.cluster import Cluster, wait_for

STEP_FIELDS = {"run_id", "step_key", "attempt", "tenant", "correlation_id", "lease_token"}


def test_a_line_logged_inside_a_step_is_json_with_the_steps_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(StepContextFilter())
    log = logging.getLogger("test.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with step_context(
            run_id="run_X", step_key="send", attempt=2, tenant=1, correlation_id="c", lease_token=9
        ):
            log.info("inside", extra={"dedupe": "hit"})
        log.info("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = [json.loads(line) for line in out.getvalue().splitlines()]
    assert inside["message"] == "inside" and inside["dedupe"] == "hit"
    expected = {"run_id": "run_X", "step_key": "send", "attempt": 2, "tenant": 1, "correlation_id": "c"}
    assert {k: inside[k] for k in STEP_FIELDS} == {**expected, "lease_token": 9}
    assert not STEP_FIELDS & set(outside), "the context ends with the step"


@pytest.mark.timeout(120)
def test_a_worker_process_logs_json_lines_with_the_step_and_effect_fields(
    sandbox_acme: Tenant, transactional_db: None, tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path, LOG_FORMAT="json")
    try:
        cluster.worker("w1")
        cluster.beat()
        run = run_start(
            tenant=sandbox_acme,
            workflow="demo.crm_update",
            input={"contact_id": 1, "changes": {"stage": "won"}},
            actor="t",
            correlation_id="deal-7",
        ).run
        wait_for(lambda: Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED, 60, cluster.logs)
        # The line is written just after the commit the test saw: wait for it before stopping.
        log = tmp_path / "w1.log"
        wait_for(
            lambda: f'"run_id": "{run.id}"' in log.read_text() and "step ended" in log.read_text(),
            30,
            "no line",
        )
    finally:
        cluster.stop()
    lines = [line for line in (tmp_path / "w1.log").read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]  # every log line parses
    about_run = [r for r in records if r.get("run_id") == run.id]
    ended = [r for r in about_run if r["message"].startswith("step ended")]
    assert ended and set(ended[0]) >= STEP_FIELDS, ended
    assert ended[0]["correlation_id"] == "deal-7" and ended[0]["step_key"] == "apply_changes"
    [effect] = [r for r in about_run if r.get("idempotency_key")]
    assert (
        effect["dedupe"] == "miss"
        and effect["idempotency_key"] == f"{run.id}:apply_changes:crm.update_contact"
    )
    assert set(effect) >= STEP_FIELDS
