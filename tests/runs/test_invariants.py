"""check_invariants (issue 11, first slice): quiet on a healthy system that ran every kind of
run, and each check catches the violation it is for (planted directly in the tables, as a bug
or a crash would leave it)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F
from django.test import Client
from django.utils import timezone

from core.models import Lease, Tenant, TenantQuota
from demo.models import SandboxCall
from runs.dispatch import dispatch_round
from runs.invariants import check_invariants
from runs.models import QueueDepth, Run, Step, StepStatus
from runs.services import run_cancel, run_start
from tests.approvals.helpers import pump

pytestmark = pytest.mark.both_dialects

LONG_AGO = timedelta(minutes=5)


def checks_failing() -> set[str]:
    return {finding.check for finding in check_invariants()}


def a_run(tenant: Tenant, workflow: str = "demo.enrich_lead", **kwargs: object) -> Run:
    kwargs.setdefault("input", {"lead_id": 3})
    return run_start(tenant=tenant, workflow=workflow, actor="t", **kwargs).run  # type: ignore[arg-type]


@pytest.mark.django_db(transaction=True)
def test_a_healthy_system_that_ran_every_kind_of_run_holds_every_invariant(sandbox_acme: Tenant) -> None:
    for n in range(3):
        a_run(sandbox_acme)
        a_run(sandbox_acme, "demo.chat_reply", input={"contact_id": 1, "message": f"m{n}"}, session_key="c1")
    a_run(
        sandbox_acme,
        "demo.order_checkout",
        input={"invoice_id": 2, "amount": "10.00", "sku": "S", "simulate_confirm_failure": True},
    )
    run_cancel(
        run=a_run(sandbox_acme, "demo.lead_followup", input={"lead_id": 1, "contact_id": 1}), actor="t"
    )
    for _ in range(20):
        pump()
    assert check_invariants() == []
    out = Client().get("/metrics").content.decode()
    assert 'runwarden_invariant_violations{check="sessions"} 0.0' in out
    call_command("check_invariants")  # exit code 0


@pytest.mark.django_db(transaction=True)
def test_each_check_catches_what_it_is_for(sandbox_acme: Tenant) -> None:
    past = timezone.now() - LONG_AGO
    # caps: two live holders where the cap (lowered behind their back) is one.
    for n in range(4):
        a_run(sandbox_acme, input={"lead_id": n + 1})
    admitted = dispatch_round()
    assert len(admitted) == 4
    TenantQuota.objects.filter(tenant=sandbox_acme).update(max_concurrent_steps=1)
    # admitted_without_lease / lease_without_step: one admission loses its lease, another its step.
    lost, orphaned = (Step.objects.get(pk=a.step_id) for a in admitted[2:])
    Lease.objects.filter(pk=lost.lease_id).update(expires_at=past)
    Step.objects.filter(pk=lost.pk).update(updated_at=past)
    Lease.objects.filter(pk=orphaned.lease_id).update(acquired_at=past)
    Step.objects.filter(pk=orphaned.pk).update(status=StepStatus.READY)
    # effects_once: the provider saw one key twice.
    for _ in range(2):
        SandboxCall.objects.create(
            tenant=sandbox_acme, connector="payments", operation="charge", target="x",
            idempotency_key="k-1", ok=True, started_at=past, finished_at=past,
        )  # fmt: skip
    # sessions: two active runs in a session that allows one.
    pair = [
        a_run(sandbox_acme, "demo.chat_reply", input={"contact_id": 1, "message": "x"}, session_key="s")
        for _ in range(2)
    ]
    Run.objects.filter(pk__in=[r.pk for r in pair]).update(session_state="active")
    # runs_explained: an unfinished run with nothing to run.
    stuck = a_run(sandbox_acme)
    Step.objects.filter(run=stuck).update(status=StepStatus.PENDING)
    Run.objects.filter(pk=stuck.pk).update(updated_at=past)
    # events_match_states: a run marked succeeded with no event saying so.
    silent = a_run(sandbox_acme)
    Run.objects.filter(pk=silent.pk).update(status="succeeded")
    # parked_for_a_human: waiting for an approval nobody was asked for.
    parked = a_run(sandbox_acme)
    Step.objects.filter(run=parked).update(status=StepStatus.WAITING_APPROVAL)
    # queue_depth_counted: a counter that lost track of a run (PostgreSQL keeps counters).
    counted = {"queue_depth_counted"} if connection.vendor == "postgresql" else set()
    QueueDepth.objects.filter(tenant=sandbox_acme).update(unfinished=F("unfinished") + 1)

    assert checks_failing() == counted | {
        "caps",
        "admitted_without_lease",
        "lease_without_step",
        "effects_once",
        "sessions",
        "runs_explained",
        "events_match_states",
        "parked_for_a_human",
    }
    with pytest.raises(CommandError):
        call_command("check_invariants")
