from __future__ import annotations

import pytest

from core import tallies
from core.models import Event, Tally, Tenant
from runs.models import Run, TriggerEvent
from runs.services import RunStart, TriggerPayloadMismatch, run_create
from tests.concurrency import run_concurrently
from tests.dialects import RACING_THREADS

pytestmark = pytest.mark.both_dialects


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_fifty_concurrent_deliveries_of_one_trigger_make_one_run(acme: Tenant) -> None:
    for trial in range(5):
        trigger = f"evt-{trial}"

        def deliver(i: int, trigger: str = trigger) -> RunStart:
            return run_create(
                tenant=acme,
                workflow="demo.enrich_lead",
                input={"lead_id": 7},
                actor=f"hook{i}",
                trigger_event_id=trigger,
            )

        results = run_concurrently(deliver, 50, timeout=120)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert sum(r.created for r in results) == 1
        assert len({r.run.id for r in results}) == 1
        assert Run.objects.filter(trigger_event_id=trigger).count() == 1
    assert TriggerEvent.objects.count() == 5
    # 49 duplicates per trigger answered from the record, each counted once in the tally.
    suppressed = Tally.objects.filter(tenant=acme, name=tallies.DUPLICATES_SUPPRESSED)
    assert sum(t.count for t in suppressed) == 5 * 49


@pytest.mark.django_db(transaction=True)
def test_the_same_trigger_with_another_payload_is_refused_and_recorded(acme: Tenant) -> None:
    first = run_create(
        tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 7}, actor="a", trigger_event_id="e1"
    )
    replay = run_create(
        tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 7}, actor="a", trigger_event_id="e1"
    )
    assert (first.created, replay.created, replay.run.id) == (True, False, first.run.id)
    with pytest.raises(TriggerPayloadMismatch) as refused:
        run_create(
            tenant=acme, workflow="demo.enrich_lead", input={"lead_id": 8}, actor="a", trigger_event_id="e1"
        )
    assert refused.value.run_id == first.run.id
    assert Run.objects.count() == 1
    assert Event.objects.filter(verb="duplicate_trigger_payload", subject=f"run:{first.run.id}").count() == 1


@pytest.mark.django_db(transaction=True)
def test_trigger_ids_are_per_tenant_and_runs_without_one_are_never_deduplicated(
    acme: Tenant, globex: Tenant
) -> None:
    a = run_create(tenant=acme, workflow="w", input={}, actor="a", trigger_event_id="same")
    b = run_create(tenant=globex, workflow="w", input={}, actor="a", trigger_event_id="same")
    assert a.run.id != b.run.id
    c = run_create(tenant=acme, workflow="w", input={}, actor="a")
    d = run_create(tenant=acme, workflow="w", input={}, actor="a")
    assert c.run.id != d.run.id
    assert c.run.id.startswith("run_") and len(c.run.id) == 30
