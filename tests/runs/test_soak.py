"""The soak (issue 11): mixed demo runs across two tenants on real worker processes, with random
worker kills, approvals decided by racing clients and the conflicts the kills leave settled by a
reviewer who checks the provider's log; at the end no run is lost, no effect reached the
provider twice, every approval was decided once, and ``check_invariants`` is clean.

``make test`` runs a short variant (RUNWARDEN_SOAK_RUNS, default 300); ``make soak`` the long
one (2,000 runs) and writes its figures to bench/soak.json (docs/guarantees.md)."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.db.models import Count

from approvals import services as approvals_services
from approvals.models import ApprovalRequest, ConflictArtifact
from core.models import Role, Tenant, User
from demo.models import SandboxCall
from demo.sandbox import seed_sandbox
from runs.invariants import check_invariants
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.conftest import make_member
from tests.runs.cluster import Cluster

RUNS = int(os.environ.get("RUNWARDEN_SOAK_RUNS", "300"))
REPORT = os.environ.get("RUNWARDEN_SOAK_REPORT", "")
SETTLED = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CONFLICT, RunStatus.EXPIRED}


def _start(tenant: Tenant, n: int) -> str:
    """One run of a mixed demo workload (shared contacts, so entity locks contend)."""
    contact = 1 + n % 8
    choice = n % 6
    if choice in (0, 1):
        spec: dict[str, Any] = {
            "workflow": "demo.crm_update",
            "input": {"contact_id": contact, "changes": {"stage": f"s{n}"}},
        }
    elif choice == 2:
        spec = {"workflow": "demo.enrich_lead", "input": {"lead_id": contact}}
    elif choice == 3:
        spec = {"workflow": "demo.lead_followup", "input": {"lead_id": contact, "contact_id": contact}}
    elif choice == 4:
        spec = {
            "workflow": "demo.chat_reply",
            "input": {"contact_id": contact, "message": f"m{n}"},
            "session_key": f"conv-{n % 3}",
        }
    else:
        spec = {"workflow": "demo.invoice_payment", "input": {"invoice_id": 1 + n % 5, "amount": "10.00"}}
    return run_start(tenant=tenant, actor="soak", trigger_event_id=f"soak-{n}", **spec).run.id


@pytest.mark.timeout(int(os.environ.get("RUNWARDEN_SOAK_TIMEOUT", "480")))
def test_soak_mixed_runs_with_worker_kills_and_racing_approvals(
    acme: Tenant, globex: Tenant, transactional_db: None, tmp_path: Path
) -> None:
    for tenant in (acme, globex):
        seed_sandbox(tenant.pk)
    deciders = {
        tenant.pk: [make_member(f"{tenant.slug}-approver{i}", tenant, Role.OPERATOR) for i in range(3)]
        for tenant in (acme, globex)
    }
    reviewers = {
        tenant.pk: make_member(f"{tenant.slug}-reviewer", tenant, Role.REVIEWER) for tenant in (acme, globex)
    }
    cluster = Cluster(tmp_path, RUNWARDEN_SANDBOX_LATENCY_MS="10", RUNWARDEN_DEFAULT_LEASE_SECONDS="3")
    stop = threading.Event()
    figures: Counter[str] = Counter()
    decisions: Counter[int] = Counter()  # approval id -> winning decisions
    started_at = time.monotonic()
    try:
        workers = [f"w{i}" for i in range(1, 4)]
        for name in workers:
            cluster.worker(name, concurrency=2)
        cluster.beat()
        cluster.dispatcher("standby")

        def chaos() -> None:
            rng = random.Random(7)
            n = len(workers)
            while not stop.wait(rng.uniform(1.5, 3.5)):
                victim = rng.choice(workers)
                process = cluster.processes[victim]
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
                    figures["workers_killed"] += 1
                n += 1
                replacement = f"w{n}"
                workers[workers.index(victim)] = replacement
                cluster.worker(replacement, concurrency=2)

        def approve_racing() -> None:
            try:
                while not stop.wait(0.3):
                    for request in ApprovalRequest.objects.filter(status="pending").select_related("run")[
                        :20
                    ]:
                        _race(request, deciders[request.tenant_id], decisions, figures)
            finally:
                connections.close_all()

        def review() -> None:
            # A reviewer settles what the kills left ambiguous, as a careful one would: by
            # checking the provider's log. (A session waits behind its run in conflict.)
            try:
                while not stop.wait(1.0):
                    for conflict in ConflictArtifact.objects.filter(status="open").select_related("effect")[
                        :20
                    ]:
                        _settle(conflict, reviewers[conflict.tenant_id], figures)
            finally:
                connections.close_all()

        helpers = [
            threading.Thread(target=chaos, daemon=True),
            threading.Thread(target=approve_racing, daemon=True),
            threading.Thread(target=review, daemon=True),
        ]
        for helper in helpers:
            helper.start()
        ids = [
            _start(tenant, n) for n in range(RUNS) for tenant in (acme, globex) if (n + tenant.pk) % 2 == 0
        ]
        ids += [_start(acme if n % 2 else globex, RUNS + n) for n in range(RUNS - len(ids))]
        figures["runs"] = len(ids)
        deadline = time.monotonic() + float(os.environ.get("RUNWARDEN_SOAK_SETTLE_SECONDS", "360"))
        while Run.objects.filter(pk__in=ids).exclude(status__in=SETTLED).exists():
            assert time.monotonic() < deadline, _unsettled(ids) + cluster.logs()
            time.sleep(0.5)
        stop.set()
        for helper in helpers:
            helper.join(30)
    finally:
        stop.set()
        cluster.stop()
    figures["seconds"] = round(time.monotonic() - started_at)

    statuses = Counter(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
    figures.update({f"runs_{status}": n for status, n in statuses.items()})
    assert sum(statuses.values()) == len(ids), "no run lost"
    # A run in conflict is explained by its open artifact (a kill during an effect is ambiguous).
    for run_id in Run.objects.filter(pk__in=ids, status=RunStatus.CONFLICT).values_list("pk", flat=True):
        assert ConflictArtifact.objects.filter(run_id=run_id, status="open").exists(), run_id
    doubled = (
        SandboxCall.objects.exclude(idempotency_key="")
        .values("operation", "idempotency_key")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    assert not list(doubled), f"an effect reached the provider twice: {list(doubled)[:5]}"
    assert decisions, "no approval was raced: the soak proved nothing about decisions"
    assert all(wins == 1 for wins in decisions.values()), "an approval was decided twice"
    assert not [k for k in figures if k.startswith("race_error_")], dict(figures)
    figures["effects"] = SandboxCall.objects.count()
    figures["approvals_decided"] = len(decisions)
    figures["conflicts"] = ConflictArtifact.objects.count()
    findings = check_invariants()
    figures["invariant_findings"] = len(findings)
    if REPORT:
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT).write_text(json.dumps(dict(figures), indent=2, sort_keys=True) + "\n")
    print("soak figures:", dict(figures))
    assert not findings, "\n".join(str(f) for f in findings)
    assert figures["workers_killed"] >= 1, "the soak must kill workers"


def _unsettled(ids: list[str]) -> str:
    """What the runs that did not settle are waiting for."""
    from runs.models import Step

    lines = [f"statuses: {dict(Counter(Run.objects.filter(pk__in=ids).values_list('status', flat=True)))}"]
    for run in Run.objects.filter(pk__in=ids).exclude(status__in=SETTLED)[:8]:
        steps = [
            (s.key, s.status, s.attempt, str(s.error)[:80])
            for s in Step.objects.filter(run=run).order_by("position")
        ]
        lines.append(f"{run.id} {run.workflow} {run.status} session={run.session_state} steps={steps}")
    return "\n".join(lines) + "\n"


def _settle(conflict: ConflictArtifact, reviewer: User, figures: Counter[str]) -> None:
    allowed = approvals_services.resolutions_for(conflict)
    kwargs: dict[str, str] = {}
    if conflict.kind == "lease_expired_with_pending_effect" and conflict.effect is not None:
        connector, _, operation = conflict.effect.kind.partition(".")
        call = SandboxCall.objects.filter(
            run_id=conflict.run_id or "", connector=connector, operation=operation, ok=True
        ).first()
        resolution = "mark_effect_committed" if call else "mark_effect_not_sent"
        if call:
            kwargs["external_ref"] = f"sandbox-call:{call.pk}"
    else:
        resolution = "acknowledge" if "acknowledge" in allowed else sorted(allowed)[0]
    try:
        approvals_services.conflict_resolve(
            conflict=conflict,
            user=reviewer,
            expected_version=conflict.version,
            resolution=resolution,
            **kwargs,
        )
        figures[f"conflicts_resolved_{resolution}"] += 1
    except approvals_services.ResolutionConflict:
        pass  # settled meanwhile


def _race(
    request: ApprovalRequest, users: list[User], decisions: Counter[int], figures: Counter[str]
) -> None:
    """Three clients approve the same request at the same moment: exactly one may win."""
    barrier = threading.Barrier(len(users))
    won: list[int] = []

    def decide(user: User) -> None:
        try:
            barrier.wait(10)
            approvals_services.approval_decide(
                request=ApprovalRequest.objects.get(pk=request.pk),
                user=user,
                decision="approve",
                expected_version=request.version,
            )
            won.append(1)
        except (approvals_services.DecisionConflict, approvals_services.DecisionForbidden):
            figures["approval_races_lost"] += 1
        except Exception as unexpected:  # noqa: BLE001  (reported, then the soak fails)
            figures[f"race_error_{type(unexpected).__name__}"] += 1
        finally:
            connections.close_all()

    threads = [threading.Thread(target=decide, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if won:
        decisions[request.pk] += len(won)
