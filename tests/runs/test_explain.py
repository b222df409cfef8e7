# ruff: noqa: E501
"""Why a step is not running: every kind of wait, named with what it waits for and who holds it,
on the run page too; another tenant's runs are never named."""

from __future__ import annotations

from datetime import timedelta

from django.test import override_settings
from django.utils import timezone

from core import services as core_services
from core.leases import lease_acquire
from core.models import Lease, Tenant, User
from runs.dispatch import dispatch_round
from runs.explain import explain_run
from runs.models import Run, Step
from runs.services import run_start
from tests.approvals.helpers import pump
from tests.conftest import client_for

NO_CAPS = {"global": 50, "tenant_default": 10, "workflow": {}, "lane": {}, "tool": {}}


def waits_of(run: Run) -> dict[str, object]:
    steps = list(Step.objects.filter(run=run))
    waits = explain_run(Run.objects.get(pk=run.pk), steps)
    return {step.key: waits.get(step.pk) for step in steps}


@override_settings(RUNWARDEN_CAPS=NO_CAPS)
def test_a_step_waiting_for_a_lock_names_the_lock_and_its_holder(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    holder = run_start(
        tenant=sandbox_acme,
        workflow="demo.crm_update",
        input={"contact_id": 1, "changes": {"stage": "a"}},
        actor="t",
    ).run
    assert dispatch_round(), "the holder is admitted and takes crm_contact:1"
    waiter = run_start(
        tenant=sandbox_acme,
        workflow="demo.crm_update",
        input={"contact_id": 1, "changes": {"stage": "b"}},
        actor="t",
    ).run
    assert not dispatch_round()
    wait = waits_of(waiter)["apply_changes"]
    assert wait is not None and wait.kind == "lock", wait
    assert (
        wait.key == "crm_contact:1" and wait.holder_run == holder.id and wait.holder_step == "apply_changes"
    )
    client = client_for(acme_operator)
    page = client.get(f"/runs/{waiter.id}/").content.decode()
    assert "Why not running: waits for the lock crm_contact:1" in page
    assert f'href="/runs/{holder.id}/"' in page


@override_settings(RUNWARDEN_CAPS=NO_CAPS)
def test_the_why_not_line_says_it_once_with_the_token_only_in_a_detail(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    data = {"contact_id": 1, "changes": {"stage": "a"}}
    holder = run_start(tenant=sandbox_acme, workflow="demo.crm_update", input=data, actor="t").run
    assert dispatch_round()
    waiter = run_start(tenant=sandbox_acme, workflow="demo.crm_update", input=data, actor="t").run
    assert not dispatch_round()
    wait = waits_of(waiter)["apply_changes"]
    lease = Lease.objects.get(tenant=sandbox_acme, key="crm_contact:1", released_at=None)
    assert wait is not None and wait.text == "waits for the lock crm_contact:1" and wait.token == lease.token
    page = client_for(acme_operator).get(f"/runs/{waiter.id}/").content.decode()
    line = page[page.index('id="wait-apply_changes"') :]
    line = line[: line.index("</tr>")]
    assert line.count("held by") == 1 and line.count(f">{holder.id}<") == 1, line
    before_detail, detail = line.split('<details class="wait-more">')
    assert "token" not in before_detail and f">{lease.token}<" not in before_detail
    assert f'fencing token <span class="mono">{lease.token}</span>' in detail


def test_a_lock_held_by_no_run_names_its_holder_in_the_text(acme: Tenant) -> None:
    lease_acquire(tenant_id=acme.pk, key="crm_contact:5", holder="nightly-import", ttl=60)
    run = run_start(
        tenant=acme, workflow="demo.crm_update", input={"contact_id": 5, "changes": {"stage": "x"}}, actor="t"
    ).run
    wait = waits_of(run)["apply_changes"]
    assert wait is not None and wait.kind == "lock", wait
    assert wait.text == "waits for the lock crm_contact:5, held by nightly-import" and not wait.holder_run


@override_settings(RUNWARDEN_CAPS=NO_CAPS)
def test_a_full_cap_names_the_scope_and_the_tenants_own_holders_only(
    acme: Tenant, globex: Tenant, acme_admin: User
) -> None:
    core_services.tenant_quota_update(tenant=acme, actor=acme_admin, changes={"caps": {"lane": {"read": 1}}})
    first = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    run_start(tenant=globex, workflow="bench.noop", input={}, actor="t")
    second = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    dispatch_round()
    wait = waits_of(second)["noop"]
    assert wait is not None and wait.kind == "cap", wait
    assert "the tenant's lane read" in wait.text and "1 of 1" in wait.text
    assert wait.holders == [first.id]


@override_settings(RUNWARDEN_CAPS={**NO_CAPS, "global": 1})
def test_a_platform_cap_never_names_another_tenants_runs(acme: Tenant, globex: Tenant) -> None:
    run_start(tenant=globex, workflow="bench.noop", input={}, actor="t")
    dispatch_round()
    waiting = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    wait = waits_of(waiting)["noop"]
    assert wait is not None and wait.kind == "cap" and wait.holders == []
    # How much of a shared scope other tenants hold is theirs: no count of it is shown.
    assert "1 of 1" not in wait.text and "0 of the admitted steps are yours" in wait.text, wait.text


def test_backoff_predecessor_and_admissible_are_told_apart(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 1}, actor="t").run
    waits = waits_of(run)
    assert waits["fetch_lead"].kind == "admissible"  # type: ignore[union-attr]
    assert waits["summarize"].kind == "predecessor" and "fetch_lead" in waits["summarize"].text  # type: ignore[union-attr]
    later = timezone.now() + timedelta(seconds=30)
    Step.objects.filter(run=run, key="fetch_lead").update(available_at=later, attempt=1)
    wait = waits_of(run)["fetch_lead"]
    assert wait.kind == "backoff" and wait.until == later  # type: ignore[union-attr]


def test_a_gated_step_names_the_approval_and_who_may_decide(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User, acme_admin: User
) -> None:
    run = run_start(
        tenant=sandbox_acme, workflow="demo.lead_followup", input={"lead_id": 1, "contact_id": 1}, actor="t"
    ).run
    pump()
    wait = waits_of(run)["send_message"]
    assert wait is not None and wait.kind == "human", wait
    assert "waits for approval #" in wait.text and "may decide: admin, operator" in wait.text
    assert wait.link.startswith("/approvals/#approval-")


def test_a_run_waiting_for_its_session_turn_says_so(acme: Tenant) -> None:
    first = run_start(
        tenant=acme,
        workflow="demo.chat_reply",
        input={"contact_id": 1, "message": "a"},
        actor="t",
        session_key="c1",
    ).run
    second = run_start(
        tenant=acme,
        workflow="demo.chat_reply",
        input={"contact_id": 1, "message": "b"},
        actor="t",
        session_key="c1",
    ).run
    dispatch_round()
    assert Run.objects.get(pk=first.pk).session_state == "active"
    wait = waits_of(second)["load_contact"]
    assert wait is not None and wait.kind == "session" and "c1" in wait.text


def test_the_lock_wait_needs_no_other_tenants_lease(acme: Tenant, globex: Tenant) -> None:
    lease_acquire(tenant_id=globex.pk, key="crm_contact:2", holder="globex-worker", ttl=60)
    run = run_start(
        tenant=acme, workflow="demo.crm_update", input={"contact_id": 2, "changes": {"stage": "x"}}, actor="t"
    ).run
    wait = waits_of(run)["apply_changes"]
    assert wait is not None and wait.kind != "lock", "a lock of another tenant is not this tenant's key"


@override_settings(RUNWARDEN_CAPS=NO_CAPS)
def test_the_board_lists_waiters_in_admission_order_with_their_reason_and_drops_them_when_freed(
    sandbox_acme: Tenant, globex: Tenant, acme_operator: User
) -> None:
    from runs.executor import step_execute
    from runs.selectors import ownership_board

    def start(stage: str) -> Run:
        return run_start(
            tenant=sandbox_acme,
            workflow="demo.crm_update",
            input={"contact_id": 3, "changes": {"stage": stage}},
            actor="t",
        ).run

    holder = start("a")
    [admission] = dispatch_round()
    waiters = [start("b"), start("c")]
    dispatch_round()
    lease_acquire(tenant_id=globex.pk, key="crm_contact:3", holder="globex-worker", ttl=60)
    rows = {hold["key"]: hold for card in ownership_board(acme_operator) for hold in card["holds"]}
    row = rows["crm_contact:3"]
    assert row["run_id"] == holder.id and row["tenant"] == "acme" and not row["stale"]
    assert [(w["run_id"], w["position"]) for w in row["waiters"]] == [(waiters[0].id, 1), (waiters[1].id, 2)]
    assert all(w["reason"].kind == "lock" for w in row["waiters"])
    assert not [r for r in rows.values() if r["tenant"] != "acme"], "another tenant's lock is never shown"
    assert ownership_board(acme_operator, prefix="invoice:") == []
    step_execute(step_id=admission.step_id, token=admission.token)
    dispatch_round()  # the first waiter takes the lock
    row = {h["key"]: h for card in ownership_board(acme_operator) for h in card["holds"]}["crm_contact:3"]
    assert row["run_id"] == waiters[0].id
    queue = [w["run_id"] for w in row["waiters"]]
    assert waiters[0].id not in queue and waiters[1].id in queue, "the new holder left the queue"
