"""Compensation (issue 9): after a failure or a cancel, what committed is undone in reverse
order, each compensation through the ledger under its own key — exactly once, even when a
worker dies in the middle of one — and a compensation that keeps failing waits for a reviewer."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections

from approvals.models import ConflictArtifact
from approvals.services import conflict_resolve
from core.models import Event, Tenant, User
from demo import sandbox
from demo.models import SandboxCall
from runs.context import StepContext
from runs.definitions import workflow
from runs.invariants import check_invariants
from runs.models import Run, SideEffect, Step
from runs.services import RunNotRetryable, run_cancel, run_retry, run_start
from tests.approvals.helpers import pump, pump_until
from tests.conftest import bearer_client, client_for
from tests.dialects import REAL_WORKERS
from tests.runs.cluster import Cluster, wait_for

pytestmark = pytest.mark.both_dialects


def calls(operation: str) -> list[SandboxCall]:
    rows = SandboxCall.objects.filter(operation=operation, ok=True)
    return list(rows.order_by("started_at", "id"))


@pytest.mark.django_db(transaction=True)
def test_a_failed_confirm_refunds_the_charge_then_releases_the_stock(sandbox_acme: Tenant) -> None:
    run = run_start(
        tenant=sandbox_acme,
        workflow="demo.order_checkout",
        input={"invoice_id": 3, "amount": "49.00", "sku": "SKU-1", "simulate_confirm_failure": True},
        actor="t",
    ).run
    pump_until(lambda: Run.objects.get(pk=run.pk).compensation == "done")
    run.refresh_from_db()
    assert run.status == "failed" and run.compensation == "done"
    steps = list(Step.objects.filter(run=run).order_by("position").values_list("key", "status"))
    assert steps == [
        ("reserve_stock", "succeeded"),
        ("charge_card", "succeeded"),
        ("confirm_order", "failed"),
        ("compensate:charge_card", "succeeded"),
        ("compensate:reserve_stock", "succeeded"),
    ], "compensations run newest first, each as a step of the run"
    refund, release = calls("refund")[0], calls("release")[0]
    assert refund.finished_at <= release.started_at, "the refund comes before the release"
    assert len(calls("refund")) == len(calls("release")) == 1
    keys = set(SideEffect.objects.filter(run=run).values_list("idempotency_key", flat=True))
    assert f"{run.id}:compensate:charge_card:payments.refund" in keys
    assert f"{run.id}:compensate:reserve_stock:inventory.release" in keys
    verbs = list(Event.objects.filter(subject=f"run:{run.id}").order_by("id").values_list("verb", flat=True))
    assert (
        verbs.index("run_failed") < verbs.index("compensation_started") < verbs.index("compensation_finished")
    )
    with pytest.raises(RunNotRetryable, match="compensated"):
        run_retry(run=run, actor="t")


@pytest.mark.django_db(transaction=True)
def test_a_run_cancelled_while_waiting_for_approval_undoes_what_it_committed(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    run = run_start(tenant=sandbox_acme, workflow="test.gated_order", input={}, actor="t").run
    pump()
    assert Run.objects.get(pk=run.pk).status == "waiting_approval"
    response = bearer_client(acme_operator).post(f"/api/v1/runs/{run.id}/cancel")
    assert response.status_code == 200
    pump_until(lambda: Run.objects.get(pk=run.pk).compensation == "done")
    run.refresh_from_db()
    assert run.status == "cancelled" and run.compensation == "done"
    shown = bearer_client(acme_operator).get(f"/api/v1/runs/{run.id}").json()
    assert shown["compensation"] == "done" and shown["status"] == "cancelled"
    page = client_for(acme_operator)
    html = page.get(f"/runs/{run.id}/").content.decode()
    assert "Replay as a new run" in html and "Retry from failed step" not in html, "compensated: replay only"
    assert len(calls("refund")) == 1 and len(calls("release")) == 1
    assert calls("refund")[0].finished_at <= calls("release")[0].started_at


@pytest.mark.django_db(transaction=True)
def test_a_run_with_nothing_committed_has_nothing_to_compensate(sandbox_acme: Tenant) -> None:
    run = run_start(tenant=sandbox_acme, workflow="test.gated_order", input={}, actor="t").run
    assert run_cancel(run=run, actor="t")  # before anything ran
    pump()
    run.refresh_from_db()
    assert run.compensation == "" and not Step.objects.filter(run=run, compensates__gt="").exists()


@pytest.mark.django_db(transaction=True)
def test_a_compensation_that_keeps_failing_opens_a_conflict_a_reviewer_settles(
    sandbox_acme: Tenant, acme_reviewer: User
) -> None:
    run = run_start(
        tenant=sandbox_acme, workflow="test.failing_order", input={"refund_always_fails": True}, actor="t"
    ).run
    pump_until(lambda: Run.objects.get(pk=run.pk).compensation == "failed", rounds=80)
    run.refresh_from_db()
    assert run.status == "failed" and run.compensation == "failed"
    refund_step = Step.objects.get(run=run, key="compensate:take_payment")
    assert refund_step.status == "conflict" and refund_step.attempt == 5
    release_step = Step.objects.get(run=run, key="compensate:hold_stock")
    assert release_step.status == "pending", "later compensations wait behind the one in conflict"
    conflict = ConflictArtifact.objects.get(run=run, kind="compensation_failed", status="open")

    conflict_resolve(
        conflict=conflict,
        user=acme_reviewer,
        expected_version=conflict.version,
        resolution="mark_compensated",
        note="refunded by hand in the provider's dashboard",
    )
    pump_until(lambda: Run.objects.get(pk=run.pk).compensation == "done")
    assert Step.objects.get(pk=refund_step.pk).status == "succeeded"
    assert len(calls("release")) == 1 and len(calls("refund")) == 0
    assert Run.objects.get(pk=run.pk).compensation == "done"


@REAL_WORKERS
@pytest.mark.timeout(120)
def test_a_worker_killed_in_the_middle_of_a_compensation_never_compensates_twice(
    sandbox_acme: Tenant, cluster: Cluster
) -> None:
    cluster.worker("w1", queues=["read", "external"], concurrency=1)
    cluster.dispatcher("d1")
    runs = [
        run_start(
            tenant=sandbox_acme,
            workflow="test.failing_order",
            input={"invoice_id": n + 1, "crash_in_refund": True},
            actor="t",
        ).run
        for n in range(3)
    ]
    workers = ["w1"]

    def settled() -> bool:
        if cluster.processes[workers[-1]].poll() is not None:  # it died mid-refund: start another
            workers.append(f"w{len(workers) + 1}")
            cluster.worker(workers[-1], queues=["read", "external"], concurrency=1)
        return all(r.compensation == "done" for r in Run.objects.filter(pk__in=[r.id for r in runs]))

    wait_for(settled, 100, "every run compensated after the crashes")
    assert len(workers) == len(runs) + 1, "a worker really died in the middle of each refund"
    for run in runs:
        keys = SideEffect.objects.filter(run=run, kind="payments.refund")
        assert keys.count() == 1 and keys.get().status == "committed"
        assert Step.objects.get(run=run, key="compensate:take_payment").attempt >= 2
    refunds = SandboxCall.objects.filter(operation="refund", ok=True)
    assert refunds.count() == len(runs), "each charge refunded exactly once"
    assert SandboxCall.objects.filter(operation="release", ok=True).count() == len(runs)
    assert check_invariants() == []


# An effect still in flight when its run is cancelled is undone once it commits.
_charge_may_finish = threading.Event()
slow_charge = workflow("test.slow_charge", description="a charge that takes its time")


@slow_charge.step(
    lane="external",
    tool="inventory",
    compensate=lambda ctx, results: ctx.effect(
        "inventory.release",
        lambda: sandbox.inventory_release(
            tenant_id=ctx.tenant_id, reservation_id=results["inventory.reserve"]["reservation_id"]
        ),
        request={},
    ),
)
def reserve_first(ctx: StepContext) -> dict[str, Any]:
    return ctx.effect(
        "inventory.reserve",
        lambda: sandbox.inventory_reserve(tenant_id=ctx.tenant_id, sku="SKU-S", quantity=1),
        request={},
    )


def _slow_refund(ctx: StepContext, results: dict[str, Any]) -> Any:
    charge = results["payments.charge"]
    return ctx.effect(
        "payments.refund",
        lambda: sandbox.payments_refund(
            tenant_id=ctx.tenant_id, payment_id=charge["payment_id"], amount=charge["amount"]
        ),
        request={"payment_id": charge["payment_id"]},
    )


@slow_charge.step(lane="external", tool="payments", compensate=_slow_refund, backoff_seconds=0.05)
def charge_slowly(ctx: StepContext) -> dict[str, Any]:
    def charge() -> dict[str, Any]:
        assert _charge_may_finish.wait(30), "the test never let the charge finish"
        return sandbox.payments_charge(tenant_id=ctx.tenant_id, invoice_id=1, amount=Decimal("5.00"))

    return ctx.effect("payments.charge", charge, request={"invoice_id": 1})


@pytest.mark.django_db(transaction=True)
def test_an_effect_in_flight_when_the_run_is_cancelled_is_undone_once_it_commits(
    sandbox_acme: Tenant,
) -> None:
    _charge_may_finish.clear()
    run = run_start(tenant=sandbox_acme, workflow="test.slow_charge", input={}, actor="t").run

    def worker() -> None:
        try:
            pump_until(lambda: Run.objects.get(pk=run.pk).compensation == "done")
        finally:
            connections.close_all()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        wait_for(
            lambda: SideEffect.objects.filter(run=run, kind="payments.charge", status="proposed").exists(),
            20,
            "the charge is in flight",
        )
        assert run_cancel(run=run, actor="t")
        undo = list(
            Step.objects.filter(run=run, compensates__gt="")
            .order_by("position")
            .values_list("key", flat=True)
        )
        assert undo == ["compensate:charge_slowly", "compensate:reserve_first"]
    finally:
        _charge_may_finish.set()
        thread.join(60)
    run.refresh_from_db()
    assert run.status == "cancelled" and run.compensation == "done"
    assert SideEffect.objects.get(run=run, kind="payments.charge").status == "committed"
    assert len(calls("charge")) == len(calls("refund")) == len(calls("release")) == 1
    assert calls("charge")[0].finished_at <= calls("refund")[0].started_at, "undone only after it happened"


@pytest.mark.django_db(transaction=True)
def test_a_session_run_keeps_its_place_until_its_compensations_are_done(sandbox_acme: Tenant) -> None:
    first = run_start(
        tenant=sandbox_acme, workflow="test.gated_order", input={}, actor="t", session_key="order-chat"
    ).run
    second = run_start(
        tenant=sandbox_acme,
        workflow="test.gated_order",
        input={"invoice_id": 2},
        actor="t",
        session_key="order-chat",
    ).run
    pump()
    assert Run.objects.get(pk=first.pk).status == "waiting_approval"
    assert run_cancel(run=first, actor="t")
    first.refresh_from_db()
    assert first.session_state == "active" and first.compensation == "running"
    assert Run.objects.get(pk=second.pk).session_state == "waiting", "the next run waits for the undo"
    pump_until(lambda: Run.objects.get(pk=second.pk).status == "waiting_approval")
    first.refresh_from_db()
    assert first.compensation == "done" and first.session_state == "done"
    assert calls("release")[0].finished_at <= Run.objects.get(pk=second.pk).started_at
