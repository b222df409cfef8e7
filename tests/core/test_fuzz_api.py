"""schemathesis, from our own OpenAPI document, against a live server with real workers: no
answer is a 5xx, and afterwards the system still does its job (a normal run finishes and
``check_invariants`` is clean). Bounded: a fixed number of examples per operation and a seed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from approvals.models import ApprovalRequest, ConflictArtifact
from runs.models import Run, RunStatus
from tests.runs.cluster import Cluster, wait_for
from tests.servers import ROOT, base_env, console_server, database_url, manage, seed_demo_for_servers

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
EXAMPLES_PER_OPERATION = 20


def _api(url: str, token: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read() or b"null")


@pytest.mark.timeout(600)
def test_the_fuzzer_finds_no_server_error_and_a_normal_run_finishes_afterwards(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = base_env(
        DEBUG="1",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        DEMO_PASSWORD="runwarden",
    )
    seed_demo_for_servers()
    # The demo's tenant admin holds every role of acme: the fuzzer reaches every operation.
    token = manage("issue_token", "admin", "--name", "fuzz", env=env).stdout.strip().splitlines()[-1]
    cluster.worker("w1")
    cluster.beat()  # and the dispatcher
    with console_server(env, tmp_path / "serve.log") as url:
        config = tmp_path / "schemathesis.toml"
        config.write_text(_real_objects_config(url, token))
        fuzz = subprocess.run(
            [
                SCHEMATHESIS,
                "--config-file",
                str(config),
                "run",
                f"{url}/api/v1/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(EXAMPLES_PER_OPERATION),
                "--phases",
                "examples,coverage,fuzzing",
                "--seed",
                "11",
                "--workers",
                "1",
                "--header",
                f"Authorization: Bearer {token}",
                # Revoking its own token would only end the fuzzing early.
                "--exclude-path-regex",
                "^/api/v1/tokens/",
                "--suppress-health-check",
                "all",
                "--no-color",
            ],
            cwd=ROOT,
            env=base_env(SCHEMATHESIS_TELEMETRY="false"),
            capture_output=True,
            text=True,
            timeout=420,
        )
        (tmp_path / "schemathesis.txt").write_text(fuzz.stdout + fuzz.stderr)
        assert fuzz.returncode == 0, fuzz.stdout[-8000:] + fuzz.stderr[-2000:]
        tested = re.search(r"Selected: (\d+)/\d+\s+Tested: (\d+)", fuzz.stdout)
        assert tested is not None and tested.group(1) == tested.group(2), (
            "every selected operation was tested"
        )
        cases = re.search(r"(\d+) generated, (\d+) passed", fuzz.stdout)
        assert cases is not None and cases.group(1) == cases.group(2) and int(cases.group(1)) > 500, (
            fuzz.stdout[-800:]
        )

        # The fuzzer may legitimately have set any cap (queue depth 1, weight 1000...): put the
        # quota back, then a normal run must still go through to the end.
        status, _ = _api(
            f"{url}/api/v1/tenants/acme/quota",
            token,
            "PUT",
            {"max_concurrent_steps": 10, "max_queue_depth": 1000, "weight": 1, "caps": _no_caps(url, token)},
        )
        assert status == 200, _
        status, run = _api(
            f"{url}/api/v1/runs", token, "POST", {"workflow": "demo.enrich_lead", "input": {"lead_id": 1}}
        )
        assert status == 201, run
        wait_for(
            lambda: Run.objects.get(pk=run["id"]).status == RunStatus.SUCCEEDED,
            120,
            lambda: cluster.logs() + (tmp_path / "serve.log").read_text()[-3000:],
        )

    command = [sys.executable, "manage.py", "check_invariants"]
    findings = [""]

    def invariants_hold() -> bool:  # once the finished run's last writes have settled
        checked = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        findings[0] = checked.stdout + checked.stderr
        return checked.returncode == 0

    try:
        wait_for(invariants_hold, 30, "check_invariants kept finding violations", interval=0.5)
    except AssertionError:
        raise AssertionError(findings[0]) from None


def _real_objects_config(url: str, token: str) -> str:
    """Path parameters pinned to real acme objects, so the fuzzer reaches the handlers' logic
    (decisions, edits, resolutions, cancels) instead of stopping at 404s."""
    _, gated = _api(
        f"{url}/api/v1/runs",
        token,
        "POST",
        {"workflow": "demo.lead_followup", "input": {"lead_id": 1, "contact_id": 1}},
    )
    first = {"workflow": "demo.enrich_lead", "input": {"lead_id": 1}, "trigger_event_id": "fuzz-dup"}
    _api(f"{url}/api/v1/runs", token, "POST", first)
    # The same trigger with another payload: 409, and a duplicate_trigger_payload conflict.
    assert _api(f"{url}/api/v1/runs", token, "POST", {**first, "input": {"lead_id": 2}})[0] == 409
    wait_for(
        lambda: ApprovalRequest.objects.filter(run_id=gated["id"], status="pending").exists(),
        60,
        "no approval",
    )
    approval = ApprovalRequest.objects.get(run_id=gated["id"], status="pending")
    conflict = ConflictArtifact.objects.filter(tenant__slug="acme").first()
    # A connection of its own to edit and archive: the defaults runs need stay as they are.
    status, connection = _api(
        f"{url}/api/v1/tenants/acme/connections",
        token,
        "POST",
        {"environment": "staging", "provider": "crm", "name": "fuzz-target"},
    )
    assert status == 201 and conflict is not None, connection
    # An outside agent's decision to read; its long-poll not held open (the fuzzer's requests
    # time out at 10 s: a wait is for agents, not for this).
    status, decision = _api(
        f"{url}/api/v1/outside/approvals", token, "POST", {"kind": "refund", "action": {"amount": 1}}
    )
    assert status == 201, decision
    pinned = {
        "path.decision_id": decision["id"],
        "query.wait": 0,
        "path.slug": "acme",
        "path.run_id": gated["id"],
        "path.approval_id": approval.pk,
        "path.conflict_id": conflict.pk,
        "path.connection_id": connection["id"],
        "path.username": "operator",
    }
    lines = ["[parameters]", *(f'"{name}" = {json.dumps(value)}' for name, value in pinned.items())]
    return "\n".join(lines) + "\n"


def _no_caps(url: str, token: str) -> dict[str, dict[str, None]]:
    """Every cap the fuzzer may have set, removed."""
    _, quota = _api(f"{url}/api/v1/tenants/acme/quota", token)
    return {kind: dict.fromkeys(names) for kind, names in quota["caps"].items()}
