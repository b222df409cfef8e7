"""``make bench``'s page section: the console's pages with 100,000 runs and 300,000 steps in the
database (bulk-inserted into a tenant of their own), timed in this process through Django's
test client (rendering included, network not): p50 and p95 of the runs list, a run page, the
approvals inbox, the ownership board and the overview. Writes bench/pages.json."""

from __future__ import annotations

import json
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

from bench.peers.common import percentile
from core.leases import lease_acquire
from core.models import Membership, Role, Tenant, TenantQuota, User
from runs.models import Run, RunStatus, Step, StepStatus, new_run_id

BATCH = 5000


class Command(BaseCommand):
    help = "Time the console's pages with 100k runs / 300k steps seeded (make bench runs it)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--runs", type=int, default=100_000)
        parser.add_argument("--requests", type=int, default=40)
        parser.add_argument("--out", default="bench/pages.json")

    def handle(self, *args: Any, runs: int, requests: int, out: str, **options: Any) -> None:
        tenant, user = _tenant_and_operator()
        started = time.monotonic()
        seeded = _seed(tenant, runs)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")  # as autovacuum would after a bulk load: the planner needs stats
        self.stdout.write(f"seeded {seeded} runs, {seeded * 3} steps in {time.monotonic() - started:.1f} s")
        sample = Run.objects.filter(tenant=tenant).order_by("-id").values_list("id", flat=True)[runs // 2]
        _hold_locks(tenant)
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(user)
        pages = {
            "runs list": "/runs/",
            "runs list, filtered": "/runs/?status=failed",
            "run page": f"/runs/{sample}/",
            "approvals inbox": "/approvals/",
            "ownership board": "/leases/",
            "overview": "/",
        }
        results: dict[str, Any] = {"runs": Run.objects.count(), "steps": Step.objects.count(), "pages": {}}
        for name, path in pages.items():
            for _ in range(3):
                client.get(path, secure=True)  # warm the caches the first requests would pay for
            timings = []
            for _ in range(requests):
                began = time.perf_counter()
                response = client.get(path, secure=True)
                timings.append((time.perf_counter() - began) * 1000)
                assert response.status_code == 200, (path, response.status_code, response.get("Location"))
            results["pages"][name] = {
                "path": path,
                "p50_ms": round(percentile(timings, 50) or 0, 1),
                "p95_ms": round(percentile(timings, 95) or 0, 1),
            }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        self.stdout.write(
            f"{'page':<22} {'p50 ms':>8} {'p95 ms':>8}   ({results['runs']} runs, {results['steps']} steps)"
        )
        for name, figures in results["pages"].items():
            self.stdout.write(f"{name:<22} {figures['p50_ms']:>8} {figures['p95_ms']:>8}")


def _tenant_and_operator() -> tuple[Tenant, User]:
    tenant, _ = Tenant.objects.get_or_create(slug="pagebench", defaults={"name": "Page bench"})
    TenantQuota.objects.get_or_create(tenant=tenant)
    user, _ = User.objects.get_or_create(username="pagebench-operator")
    Membership.objects.get_or_create(user=user, tenant=tenant, defaults={"role": Role.ADMIN})
    return tenant, user


def _seed(tenant: Tenant, runs: int) -> int:
    """Runs of three steps each, mostly finished, some failed, a few still waiting."""
    have = Run.objects.filter(tenant=tenant).count()
    now = timezone.now()
    rng = random.Random(5)
    for offset in range(have, runs, BATCH):
        count = min(BATCH, runs - offset)
        batch_runs, batch_steps = [], []
        for n in range(count):
            created = now - timedelta(seconds=(runs - offset - n) * 2)
            status = rng.choices(
                [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.PENDING], [90, 5, 3, 2]
            )[0]
            run = Run(
                id=new_run_id(),
                tenant=tenant,
                workflow="demo.enrich_lead",
                actor="bench",
                input={"lead_id": 1 + n % 500},
                status=status,
                correlation_id=f"deal-{n % 997}",
                created_at=created,
                finished_at=None if status == RunStatus.PENDING else created + timedelta(seconds=1),
            )
            batch_runs.append(run)
            for position, key in enumerate(["fetch_lead", "summarize", "draft_note"]):
                step_status = StepStatus.SUCCEEDED if status == RunStatus.SUCCEEDED else StepStatus.PENDING
                batch_steps.append(
                    Step(run=run, tenant=tenant, key=key, position=position, lane="read", status=step_status)
                )
        with transaction.atomic():
            Run.objects.bulk_create(batch_runs)
            Step.objects.bulk_create(batch_steps)
    return runs


def _hold_locks(tenant: Tenant, keys: int = 50) -> None:
    """Fifty entity locks held, for the board to show."""
    for n in range(keys):
        lease_acquire(tenant_id=tenant.pk, key=f"crm_contact:{n}", holder=f"bench-{n}", ttl=600)
