from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest
from django.conf import settings
from django.db import connections, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core import coordination, rawsql, tallies, wakeups
from core.leases import lease_acquire, lease_release, locks_acquire, locks_release
from core.models import Event, Lease, Tenant, TenantQuota
from core.redis_client import get_redis
from core.workers import pool_announce, pool_withdraw
from runs import dispatch, executor, locking, transitions
from runs.context import StepContext
from runs.definitions import workflow
from runs.dispatch import admit_here, dispatch_round, fair_candidates
from runs.executor import step_execute
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_start
from tests.approvals.helpers import pump, sent_to_workers
from tests.concurrency import (
    held_meanwhile,
    held_per_scope,
    race_dispatchers,
    run_concurrently,
    sampled_peaks,
    tally_rows_held_meanwhile,
)
from tests.conftest import make_tenant
from tests.dialects import RACING_THREADS, postgresql_only
from tests.runs.workflows_for_tests import AwaitInput, await_then_notify
from tests.wakes import woken

pytestmark = pytest.mark.both_dialects

# Workflows whose steps fail in ways that belong to their own run.
raising = workflow("test.poison_raises", description="its only step always raises")


@raising.step(lane="read", max_attempts=1)
def explode(ctx: StepContext) -> dict[str, Any]:
    raise ValueError("this step always fails")


unfillable = workflow("test.poison_next_lock", description="the second step's lock cannot be filled")


@unfillable.step(lane="read")
def first(ctx: StepContext) -> dict[str, Any]:
    return {"unrelated": 1}


@unfillable.step(lane="read", locks=["thing:{missing}"])
def second(ctx: StepContext) -> dict[str, Any]:
    return {}


def crm_run(tenant: Tenant, contact: int, stage: str = "won") -> Run:
    return run_start(
        tenant=tenant,
        workflow="demo.crm_update",
        input={"contact_id": contact, "changes": {"stage": stage}},
        actor="t",
    ).run


NO_TOOL_CAPS = {"global": 50, "tenant_default": 10, "workflow": {}, "lane": {}, "tool": {}}


@override_settings(RUNWARDEN_CAPS=NO_TOOL_CAPS)
def test_it_admits_free_steps_past_many_that_wait_for_a_held_entity(sandbox_acme: Tenant) -> None:
    holder = lease_acquire(tenant_id=sandbox_acme.pk, key="crm_contact:1", holder="elsewhere", ttl=60)
    assert holder is not None
    blocked = [crm_run(sandbox_acme, 1, f"s{n}") for n in range(30)]
    free = [
        run_start(tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": n + 1}, actor="t").run
        for n in range(8)
    ]
    admitted = dispatch_round(limit=8)
    admitted_steps = Step.objects.filter(pk__in=[a.step_id for a in admitted])
    admitted_runs = set(admitted_steps.values_list("run_id", flat=True))
    assert admitted_runs == {run.id for run in free}, "the free steps must not wait behind the blocked ones"
    assert not Step.objects.filter(run__in=blocked).exclude(status=StepStatus.READY).exists()
    lease_release(grant=holder)
    assert len(dispatch_round(limit=8)) == 1, "exactly one waiter gets the entity once it is free"


@pytest.mark.django_db(transaction=True)
def test_waiters_for_one_entity_are_admitted_in_the_order_their_runs_started(sandbox_acme: Tenant) -> None:
    runs = [crm_run(sandbox_acme, 2, f"s{n}") for n in range(6)]
    order: list[str] = []
    for _ in range(10):
        admitted = dispatch_round()
        if not admitted:
            break
        assert len(admitted) == 1, "one holder per entity at a time"
        order.append(Step.objects.get(pk=admitted[0].step_id).run_id)
        assert step_execute(step_id=admitted[0].step_id, token=admitted[0].token) == "succeeded"
    assert order == [run.id for run in runs]


@pytest.mark.django_db(transaction=True)
def test_poisoned_runs_fail_alone_with_their_reason_and_good_runs_finish(
    sandbox_acme: Tenant, globex: Tenant
) -> None:
    good = [crm_run(sandbox_acme, 3, f"s{n}") for n in range(3)]
    good += [
        run_start(tenant=sandbox_acme, workflow="demo.enrich_lead", input={"lead_id": n + 1}, actor="t").run
        for n in range(4)
    ]
    good += [run_start(tenant=globex, workflow="bench.noop", input={}, actor="t").run for _ in range(4)]
    expected: dict[str, str] = {}
    for n in range(6):
        gone = run_start(tenant=globex, workflow="bench.noop", input={}, actor="t").run
        Run.objects.filter(pk=gone.pk).update(workflow=f"deleted.workflow_{n}")
        expected[gone.id] = "no longer registered"
        renamed = run_start(tenant=sandbox_acme, workflow="bench.noop", input={}, actor="t").run
        Step.objects.filter(run=renamed).update(key=f"renamed_{n}")
        expected[renamed.id] = "no longer has a step"
        corrupt = crm_run(sandbox_acme, 4 + n)
        Step.objects.filter(run=corrupt).update(lock_keys=["x" * 300] if n % 2 else [42])
        expected[corrupt.id] = "is not a valid key"
        raises = run_start(tenant=globex, workflow="test.poison_raises", input={}, actor="t").run
        expected[raises.id] = "this step always fails"
        unfilled = run_start(tenant=sandbox_acme, workflow="test.poison_next_lock", input={}, actor="t").run
        expected[unfilled.id] = "needs 'missing'"
    pump(rounds=60)
    for run in good:
        run.refresh_from_db()
        assert run.status == RunStatus.SUCCEEDED, (run.workflow, run.status)
    for run_id, reason in expected.items():
        run = Run.objects.get(pk=run_id)
        assert run.status == RunStatus.FAILED, (run.workflow, run.status)
        failed = run.steps.get(status=StepStatus.FAILED)
        assert reason in failed.error, (failed.error, reason)
        assert Event.objects.filter(subject=f"run:{run_id}", verb="run_failed").count() == 1


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_keyed_admissions_of_one_tenant_do_not_wait_on_each_others_lock_wait_tally(acme: Tenant) -> None:
    """Every keyed admission of a tenant adds to one lock-wait tally row per minute; a worker's
    own admission adds it once it has committed, so a second admission never waits for the
    first's transaction on that row (it did, until the first committed)."""
    first_run, second_run = crm_run(acme, 40), crm_run(acme, 41)
    admitted_first, release_first = threading.Event(), threading.Event()

    def first() -> int | None:
        with transaction.atomic():
            admission = admit_here(lanes=frozenset({"external"}))
            admitted_first.set()
            release_first.wait(10)
        return admission.step_id if admission else None

    def second() -> int | None:
        assert admitted_first.wait(10)
        with transaction.atomic(), connections["default"].cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = '3s'")  # waiting on the first's row fails
            admission = admit_here(lanes=frozenset({"external"}))
        release_first.set()
        return admission.step_id if admission else None

    try:
        results = run_concurrently(lambda i: (first, second)[i](), 2)
    finally:
        release_first.set()
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert set(results) == {Step.objects.get(run=first_run).pk, Step.objects.get(run=second_run).pk}
    since = timezone.now() - timedelta(hours=1)
    waits = tallies.tallies_since([acme.pk], since)
    assert sum(n for name, n in waits.items() if name.startswith(tallies.LOCK_WAIT_PREFIX)) == 2


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_a_workers_keyed_admission_goes_on_while_its_lock_wait_tally_waits(acme: Tenant) -> None:
    """On a worker with coordination threads, the step a keyed admission lets go on (a key's
    next holder, run by the same thread) does not wait for the lock-wait tally: another
    transaction holding the tally rows does not hold the admitting call back. The tally is
    written once they are free."""
    run = crm_run(acme, 42)
    admitted = threading.Event()
    buckets = {tallies.lock_wait_bucket(b) for b in [*tallies.LOCK_WAIT_BUCKETS, float("inf")]}

    def admit() -> int | None:
        with transaction.atomic():
            admission = admit_here(lanes=frozenset({"external"}))
        admitted.set()
        return admission.step_id if admission else None

    coordination.coordinate_on_threads(2)
    try:
        with tally_rows_held_meanwhile(acme.pk, buckets):
            admitting = threading.Thread(target=lambda: coordination.run(admit), daemon=True)
            admitting.start()
            went_on = admitted.wait(5)  # the old way waited for the rows until the holder let go
        admitting.join(10)
        assert tallies.tallies_written(10)
    finally:
        coordination.coordinate_in_place()
    assert went_on, "the admitting call waited for the tally rows another transaction held"
    assert Step.objects.get(run=run).status == StepStatus.LEASED
    waits = tallies.tallies_since([acme.pk], timezone.now() - timedelta(hours=1))
    assert sum(n for name, n in waits.items() if name.startswith(tallies.LOCK_WAIT_PREFIX)) == 1


@pytest.mark.django_db(transaction=True)
def test_a_workers_pull_passes_over_lock_keys_corrupt_beyond_strings(acme: Tenant) -> None:
    """Lock keys that are not even strings (lists, objects: no valid key, and not hashable) are
    passed over by a worker's pull as by a round, never raised into the finishing step's
    transaction; the next good step is admitted."""
    corrupt = [crm_run(acme, 20 + n) for n in range(2)]
    for run, keys in zip(corrupt, ([["a"]], [{}]), strict=True):
        Step.objects.filter(run=run).update(lock_keys=keys)
    good = crm_run(acme, 30)
    with transaction.atomic():
        admission = admit_here(lanes=frozenset({"external"}), starts=lambda c: True)
    assert admission is not None and admission.step_id == Step.objects.get(run=good).pk


def test_a_round_costs_the_same_number_of_queries_for_one_step_or_fifty(acme: Tenant) -> None:
    def round_queries(n: int) -> tuple[int, int]:
        for _ in range(n):
            run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
        with CaptureQueriesContext(connections["default"]) as captured:
            admitted = dispatch_round()
        for admission in admitted:
            step_execute(step_id=admission.step_id, token=admission.token)
        return len(admitted), len(captured.captured_queries)

    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=100)
    with override_settings(
        RUNWARDEN_CAPS={"global": 100, "tenant_default": 100, "workflow": {}, "lane": {}, "tool": {}}
    ):
        one = round_queries(1)
        fifty = round_queries(50)
    assert (one[0], fifty[0]) == (1, 50)
    assert one[1] == fifty[1] <= 16, (one, fifty)


def test_starting_and_finishing_a_step_are_one_transaction_each(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    (admission,) = dispatch_round()
    with CaptureQueriesContext(connections["default"]) as captured:
        assert step_execute(step_id=admission.step_id, token=admission.token) == "succeeded"
    statements = [q["sql"] for q in captured.captured_queries]
    # Under the test's outer transaction, the start and the finish each show as one SAVEPOINT.
    assert sum(sql.startswith("SAVEPOINT") for sql in statements) == 2, statements
    assert len(statements) <= 20, statements
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_racing_dispatchers_never_exceed_any_cap(acme: Tenant, globex: Tenant) -> None:
    caps = {"global": 5, "tenant_default": 3, "workflow": {}, "lane": {}, "tool": {}}
    TenantQuota.objects.filter(tenant__in=[acme, globex]).update(max_concurrent_steps=3)
    ids = [
        run_start(tenant=tenant, workflow="bench.noop", input={}, actor="t").run.id
        for _ in range(40)
        for tenant in (acme, globex)
    ]
    # Another connection watches what is held against each cap while the dispatchers race.
    with override_settings(RUNWARDEN_CAPS=caps), sampled_peaks(held_per_scope, every=0.001) as peaks:
        results = race_dispatchers(ids, 8, timeout=230)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sum(results) == len(ids), "every step ran exactly once"
    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"succeeded"}
    assert peaks["global"] <= 5, peaks
    assert peaks[f"tenant:{acme.pk}"] <= 3 and peaks[f"tenant:{globex.pk}"] <= 3, peaks
    assert peaks["global"] >= 4, "the race must actually press against the cap"


def test_raw_timestamps_are_made_aware_whatever_the_database_hands_back() -> None:
    aware = datetime(2026, 11, 24, 7, 0, tzinfo=UTC)
    assert rawsql.read_datetime(aware) == aware
    naive = aware.replace(tzinfo=None)  # SQLite hands back naive datetimes, in UTC
    assert rawsql.read_datetime(naive) == aware
    assert rawsql.read_datetime("2026-11-24 07:00:00") == aware
    assert rawsql.read_datetime(None) is None


# A worker pulling its next step admits it in one statement (dispatch._admit_first).
CRM_INPUT = {"contact_id": 7, "changes": {"stage": "won"}}


def _live_leases(tenant: Tenant) -> set[tuple[str, int]]:
    live = Lease.objects.filter(tenant=tenant, released_at__isnull=True, expires_at__gt=timezone.now())
    return set(live.values_list("key", "token"))


@pytest.mark.django_db(transaction=True)
def test_a_worker_pulling_its_next_step_gets_its_lease_and_entity_lock_together(acme: Tenant) -> None:
    run = run_start(tenant=acme, workflow="demo.crm_update", input=CRM_INPUT, actor="t").run
    with transaction.atomic():
        admission = admit_here(lanes=frozenset({"external"}))
    step = Step.objects.get(run=run)
    assert admission is not None and admission.step_id == step.pk
    assert step.status == StepStatus.LEASED and step.lease_token == admission.token
    [lock] = step.lock_leases
    assert lock["key"] == "crm_contact:7"
    assert _live_leases(acme) == {(f"step:{step.pk}", admission.token), ("crm_contact:7", lock["token"])}


@postgresql_only("one statement admits and starts on PostgreSQL; on SQLite the start follows it")
@pytest.mark.django_db(transaction=True)
def test_a_step_the_puller_starts_at_once_is_admitted_and_started_by_one_statement(acme: Tenant) -> None:
    """What the chain does as it finishes a step: the step it admits to itself is started in the
    same statement — running, its attempt counted, its run running, its leases a running step's
    length — exactly as ``step_attempt_start`` would leave it; a step it does not start at once
    (a gated one) is only leased."""
    run = run_start(tenant=acme, workflow="demo.crm_update", input=CRM_INPUT, actor="t").run
    other = crm_run(acme, contact=8)
    with transaction.atomic():
        admission = admit_here(lanes=frozenset({"external"}), starts=lambda c: True)
        assert admission is not None and admission.started is not None
        started = admission.started
    step = Step.objects.select_related("run").get(run=run)
    assert admission.step_id == step.pk and step.lease_token == admission.token
    assert (step.status, step.attempt, step.worker) == (StepStatus.RUNNING, 1, transitions.worker_id())
    assert step.run.status == RunStatus.RUNNING and step.run.started_at == step.started_at
    # What the executor is handed is what was written.
    assert (started.step.status, started.step.attempt, started.run.status) == (
        StepStatus.RUNNING,
        1,
        RunStatus.RUNNING,
    )
    leases = Lease.objects.filter(
        tenant=acme, released_at__isnull=True, key__in=[f"step:{step.pk}", "crm_contact:7"]
    )
    ttl = timedelta(seconds=settings.RUNWARDEN_DEFAULT_LEASE_SECONDS)
    assert {lease.expires_at for lease in leases} == {step.started_at + ttl}
    assert {(grant.key, grant.expires_at) for grant in started.grants} == {
        (f"step:{step.pk}", step.started_at + ttl),
        ("crm_contact:7", step.started_at + ttl),
    }
    with transaction.atomic():  # not started at once: leased, as a round admits
        leased = admit_here(lanes=frozenset({"external"}), starts=lambda c: False)
    assert leased is not None and leased.started is None
    assert Step.objects.get(pk=leased.step_id).run_id == other.pk
    assert Step.objects.get(pk=leased.step_id).status == StepStatus.LEASED


@pytest.mark.django_db(transaction=True)
def test_a_key_taken_between_choosing_and_granting_is_given_back_and_the_step_stays_ready(
    acme: Tenant,
) -> None:
    run = run_start(tenant=acme, workflow="demo.crm_update", input=CRM_INPUT, actor="t").run
    now = timezone.now()
    [candidate] = fair_candidates(limit=5, now=now, lanes=["external"])
    held = locks_acquire(tenant_id=acme.pk, keys=["crm_contact:7"], holder="a step body", ttl=30)
    with transaction.atomic():
        assert dispatch._admit_one(candidate, now) is None
    step = Step.objects.get(run=run)
    assert step.status == StepStatus.READY and step.lease_id is None
    assert _live_leases(acme) == {("crm_contact:7", held[0].token)}  # only the other holder's
    locks_release(held)
    with transaction.atomic():  # once the key is free, the same worker gets it
        admission = admit_here(lanes=frozenset({"external"}))
    assert admission is not None and admission.step_id == step.pk


@pytest.mark.django_db(transaction=True)
def test_a_worker_never_admits_a_step_whose_last_lease_still_lives(acme: Tenant) -> None:
    run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    with transaction.atomic():
        first = admit_here(lanes=frozenset({"read"}))
    assert first is not None
    Step.objects.filter(pk=first.step_id).update(status=StepStatus.READY)  # readied too early
    with transaction.atomic():
        assert admit_here(lanes=frozenset({"read"})) is None
    since = timezone.now() - timedelta(hours=1)
    assert tallies.tallies_since([acme.pk], since)[tallies.RETRIES_BLOCKED_BY_LEASE] == 1
    assert Step.objects.get(pk=first.step_id).lease_token == first.token


@pytest.mark.django_db(transaction=True)
def test_workers_pulling_one_step_at_a_time_serve_every_tenant_by_weight(acme: Tenant) -> None:
    """More tenants than a pull looks at, one of them of weight 2: pulls go by what each tenant
    holds now, so none is starved whatever its id, and the heavier tenant gets twice the turns."""
    tenants = [acme, *(make_tenant(f"fair{n}", f"Fair {n}") for n in range(11))]
    TenantQuota.objects.filter(tenant__in=tenants).update(max_concurrent_steps=100)
    TenantQuota.objects.filter(tenant=tenants[-1]).update(weight=2)
    for tenant in tenants:
        for _ in range(6):
            run_start(tenant=tenant, workflow="bench.noop", input={}, actor="t")
    pulled: Counter[int] = Counter()
    caps = {"global": 1000, "tenant_default": 100, "workflow": {}, "lane": {}, "tool": {}}
    with override_settings(RUNWARDEN_CAPS=caps):
        for _ in range(13 * 3):  # each admitted step stays leased: it counts as held
            with transaction.atomic():
                admission = admit_here(lanes=frozenset({"read"}))
            assert admission is not None
            pulled[Step.objects.get(pk=admission.step_id).tenant_id] += 1
    assert {t.pk: pulled[t.pk] for t in tenants} == {
        **{t.pk: 3 for t in tenants[:-1]},
        tenants[-1].pk: 6,
    }


# Workers admitting their own next steps side by side, each under one shard of the admission lock.
SHARD_CAP = dispatch.ADMISSION_SHARDS + 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("already_held", [2, 3])
def test_workers_holding_every_shard_at_once_admit_only_where_the_cap_has_room_for_all(
    acme: Tenant, already_held: int
) -> None:
    """ADMISSION_SHARDS threads each take a shard, then all choose at the same instant, none
    seeing the others' choice: with room for all of them under the cap they all admit (the cap
    is reached exactly), with one less none does (the dispatcher's round, under every shard,
    admits there); the cap is never passed."""
    if not rawsql.on_postgresql():
        pytest.skip("PostgreSQL only: SQLite admits one writer at a time, under no shard")
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    caps = {"global": 1000, "tenant_default": 1000, "workflow": {}, "lane": {}, "tool": {"crm": SHARD_CAP}}
    start = {"tenant": acme, "workflow": "test.awaits_a_tool", "input": {"wait_seconds": 1}, "actor": "t"}
    for _ in range(already_held + dispatch.ADMISSION_SHARDS):
        run_start(**start)
    with override_settings(RUNWARDEN_CAPS=caps):
        for _ in range(already_held):
            with transaction.atomic():
                dispatch.wait_for_round_lock()
                assert admit_here(lanes=frozenset({"draft"})) is not None
        shards = dispatch.ADMISSION_SHARDS
        chose = threading.Barrier(shards)

        def admit_under_a_shard(_: int) -> dispatch.Admission | None:
            with transaction.atomic():
                with connections["default"].cursor() as cursor:
                    cursor.execute(dispatch.admission_shard_sql())
                chose.wait(10)  # every thread holds a shard of its own
                admitted = admit_here(lanes=frozenset({"draft"}), headroom=dispatch.shard_headroom())
                chose.wait(10)  # none commits before all have chosen
                return admitted

        results = run_concurrently(admit_under_a_shard, shards)
    assert not [r for r in results if isinstance(r, BaseException)], results
    admitted = sum(r is not None for r in results)
    held = Step.objects.filter(run__tenant=acme, status=StepStatus.LEASED).count()
    assert held == already_held + admitted <= SHARD_CAP
    assert admitted == (shards if already_held + shards <= SHARD_CAP else 0)


BATCH = 3


def _start_tool_runs(tenant: Tenant, count: int) -> None:
    for _ in range(count):
        run_start(tenant=tenant, workflow="test.awaits_a_tool", input={"wait_seconds": 1}, actor="t")


def _tool_caps(cap: int) -> dict[str, Any]:
    return {"global": 1000, "tenant_default": 1000, "workflow": {}, "lane": {}, "tool": {"crm": cap}}


def _fill_the_tool_cap(tenant: Tenant) -> None:
    """SHARD_CAP runs of the capped crm tool started and admitted: under ``_tool_caps(SHARD_CAP)``,
    the cap full."""
    _start_tool_runs(tenant, SHARD_CAP)
    for _ in range(SHARD_CAP):
        with transaction.atomic():
            dispatch.wait_for_round_lock()
            assert admit_here(lanes=frozenset({"draft"})) is not None


def _leased(tenant: Tenant) -> set[int]:
    return set(Step.objects.filter(run__tenant=tenant, status=StepStatus.LEASED).values_list("pk", flat=True))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("room_for_more", [True, False])
def test_a_worker_with_idle_slots_takes_more_steps_where_every_cap_has_room_for_each(
    acme: Tenant, room_for_more: bool
) -> None:
    """A finishing worker whose pool has idle slots takes its next step and up to that many
    more (RUNWARDEN_WORKER_BATCH at most) in the same transaction, each sent to its lane's
    queue after commit, each only where every cap has the room its own next step needs."""
    sent_to_workers()  # an earlier test's leftovers
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    _start_tool_runs(acme, 2 + BATCH)
    headroom = dispatch.shard_headroom()
    cap = headroom + (BATCH if room_for_more else 0)
    with (
        override_settings(RUNWARDEN_WORKER_BATCH=BATCH, RUNWARDEN_CAPS=_tool_caps(cap)),
        transaction.atomic(),
    ):
        if rawsql.on_postgresql():
            with connections["default"].cursor() as cursor:
                cursor.execute(dispatch.admission_shard_sql())
        mine = admit_here(lanes=frozenset({"draft"}), headroom=headroom, idle_slots=BATCH + 5)
    assert mine is not None
    leased = _leased(acme)
    assert len(leased) == 1 + (BATCH if room_for_more else 0)
    assert mine.step_id in leased
    tokens = dict(Step.objects.filter(pk__in=leased).values_list("pk", "lease_token"))
    assert sorted(sent_to_workers()) == sorted((pk, tokens[pk]) for pk in leased - {mine.step_id})


@pytest.mark.django_db(transaction=True)
def test_a_failure_admitting_more_steps_leaves_the_workers_own_next_step_and_transaction_whole(
    acme: Tenant,
) -> None:
    """The further steps' admission fails (here: a lease row another transaction holds, past
    this one's lock timeout): only that part is undone; the worker's own next step is admitted
    and its transaction goes on and commits."""
    if not rawsql.on_postgresql():
        pytest.skip("PostgreSQL only: a lock timeout")
    sent_to_workers()
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    _start_tool_runs(acme, 2)
    first, second = Step.objects.filter(run__tenant=acme).order_by("pk").values_list("pk", flat=True)
    # The second step ran once before: its lease row is there, released, and someone holds it.
    grant = lease_acquire(tenant_id=acme.pk, key=f"step:{second}", holder="an earlier attempt", ttl=30)
    assert grant is not None and lease_release(grant=grant)
    holding, done = threading.Event(), threading.Event()

    def hold_the_lease_row() -> None:
        try:
            with transaction.atomic(), connections["default"].cursor() as cursor:
                cursor.execute("SELECT 1 FROM core_lease WHERE id = %s FOR UPDATE", [grant.id])
                holding.set()
                done.wait(30)
        finally:
            connections.close_all()

    threading.Thread(target=hold_the_lease_row, daemon=True).start()
    assert holding.wait(10)
    try:
        with (
            override_settings(RUNWARDEN_WORKER_BATCH=BATCH, RUNWARDEN_CAPS=_tool_caps(1000)),
            transaction.atomic(),
        ):
            with connections["default"].cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '200ms'")
                cursor.execute(dispatch.admission_shard_sql())
            mine = admit_here(lanes=frozenset({"draft"}), headroom=dispatch.shard_headroom(), idle_slots=1)
            assert Tenant.objects.filter(pk=acme.pk).exists()  # the transaction goes on
    finally:
        done.set()
    assert mine is not None and mine.step_id == first
    assert _leased(acme) == {first}
    assert Step.objects.get(pk=second).status == StepStatus.READY
    assert sent_to_workers() == []


@pytest.mark.django_db(transaction=True)
def test_more_steps_are_counted_against_a_room_read_once_their_shards_are_held(acme: Tenant) -> None:
    """Eight workers each hold a shard, read the room and admit their own next step before any
    of them commits (room for all eight: the cap is one more); then they finish one after the
    other, each taking, for an idle slot, shards the ones before it have released. Counted
    against the room each read first, every one after the first would add a step (15 against a
    cap of 9); counted against the room read again under the shards it took, none does."""
    if not rawsql.on_postgresql():
        pytest.skip("PostgreSQL only: SQLite admits one writer at a time, under no shard")
    sent_to_workers()
    shards = dispatch.ADMISSION_SHARDS
    cap = shards + 1
    lanes = frozenset({"draft"})
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    _start_tool_runs(acme, 40)
    all_read = threading.Barrier(shards)
    turns = [threading.Event() for _ in range(shards)]
    took = [0] * shards

    def finish_in_turn(i: int) -> None:
        try:
            with transaction.atomic():
                with connections["default"].cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [dispatch.ROUND_LOCK_ID, i])
                now = timezone.now()
                room = dispatch.load_room(now, pools_max_age=1.0)
                candidates = fair_candidates(limit=40, now=now, room=room, lanes=lanes, wait_policy_only=True)
                mine = next(c for c in candidates if dispatch._admit_one(c, now) is not None)
                all_read.wait(20)
                turns[i].wait(20)
                leased = len(_leased(acme))  # as this transaction sees them: its own too
                dispatch._admit_for_idle_slots(candidates, room, lanes, 1, now, after=mine, headroom=shards)
                took[i] = 1 + len(_leased(acme)) - leased
        finally:
            if i + 1 < shards:
                turns[i + 1].set()
            connections.close_all()

    turns[0].set()
    threads = [threading.Thread(target=finish_in_turn, args=(i,), daemon=True) for i in range(shards)]
    # Entered once, here, for every thread (settings are the process's): entered and left in
    # each thread, the last to leave would restore another's override for every later test.
    with override_settings(RUNWARDEN_CAPS=_tool_caps(cap)):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert took == [1] * shards  # each its own step, no more
    assert len(_leased(acme)) == shards <= cap
    assert sent_to_workers() == []


def _hold_shards(count: int) -> threading.Event:
    """``count`` other transactions each holding one shard of the admission lock until the
    returned event is set (then they end)."""
    done, holding = threading.Event(), threading.Barrier(count + 1)

    def hold(shard: int) -> None:
        try:
            with transaction.atomic(), connections["default"].cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [dispatch.ROUND_LOCK_ID, shard])
                holding.wait(10)
                done.wait(30)
        finally:
            connections.close_all()

    for shard in range(count):
        threading.Thread(target=hold, args=(shard,), daemon=True).start()
    try:
        holding.wait(10)
    except threading.BrokenBarrierError:
        done.set()  # the holders that did start end now
        raise
    return done


@pytest.mark.django_db(transaction=True)
def test_a_worker_takes_one_step_more_per_further_shard_it_can_take_without_waiting(acme: Tenant) -> None:
    """Each shard of the admission lock carries at most one admission unseen by the others: a
    worker takes one step more per further shard it could take; with the other shards busy it
    takes its own next step only, and waits for none of them."""
    if not rawsql.on_postgresql():
        pytest.skip("PostgreSQL only: SQLite admits one writer at a time, under no shard")
    sent_to_workers()
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    _start_tool_runs(acme, 2 + BATCH)
    shards = dispatch.ADMISSION_SHARDS
    done = _hold_shards(shards - 2)  # shards 0..5 busy: 6 and 7 free
    try:
        with (
            override_settings(RUNWARDEN_WORKER_BATCH=BATCH, RUNWARDEN_CAPS=_tool_caps(1000)),
            transaction.atomic(),
        ):
            with connections["default"].cursor() as cursor:
                cursor.execute(dispatch.admission_shard_sql())  # takes 6 or 7
            mine = admit_here(lanes=frozenset({"draft"}), headroom=shards, idle_slots=BATCH)
    finally:
        done.set()
    assert mine is not None
    assert len(_leased(acme)) == 2  # its own, and one more for the one further shard
    assert len(sent_to_workers()) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("holders", [2, 3])
def test_workers_taking_more_steps_while_others_come_and_go_on_the_other_shards_never_pass_a_cap(
    acme: Tenant, holders: int
) -> None:
    """Workers take their next steps and two more at once and keep their transactions open,
    unseen; meanwhile single admissions come and go, one after the other, on whatever shard is
    free, each seeing the others' commits but not theirs. Two such workers leave shards free,
    and the singles fill the cap up to the room they leave; three take every shard there is
    (they admitted 8 unseen, more than the 7 a single's room allows for), so no single gets in
    until they commit. The cap holds once all commit."""
    if not rawsql.on_postgresql():
        pytest.skip("PostgreSQL only: SQLite admits one writer at a time, under no shard")
    sent_to_workers()
    shards = dispatch.ADMISSION_SHARDS
    batch, cap = 2, 14
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=1000)
    _start_tool_runs(acme, 40)
    settings_here = {"RUNWARDEN_WORKER_BATCH": batch, "RUNWARDEN_CAPS": _tool_caps(cap)}
    release = threading.Event()
    admitted_unseen: list[int] = []

    # Entered once, here, for the holders' threads too (settings are the process's): entered and
    # left in each thread, the last to leave would restore another's override for every later test.
    with override_settings(**settings_here):

        def take_more_and_hold(ready: threading.Event) -> None:
            try:
                with transaction.atomic():
                    with connections["default"].cursor() as cursor:
                        cursor.execute(dispatch.admission_shard_sql())
                    before = len(_leased(acme))  # as this transaction sees them: its own too
                    assert (
                        admit_here(lanes=frozenset({"draft"}), headroom=shards, idle_slots=batch) is not None
                    )
                    admitted_unseen.append(len(_leased(acme)) - before)
                    ready.set()
                    release.wait(30)
            finally:
                ready.set()
                connections.close_all()

        newest_first = list(
            Step.objects.filter(run__tenant=acme).order_by("-pk").values_list("pk", flat=True)
        )
        holding = []
        for _ in range(holders):  # one after the other: each takes what shards are left
            ready = threading.Event()
            holding.append(threading.Thread(target=take_more_and_hold, args=(ready,), daemon=True))
            holding[-1].start()
            assert ready.wait(10)
        singles = 0
        try:
            # Single admissions, each committed, on any free shard, never waiting; each names
            # its step (as a run's next step is named), past the ones the three hold.
            for step_id in newest_first:
                with transaction.atomic():
                    with connections["default"].cursor() as cursor:
                        cursor.execute(
                            "SELECT count(*) FROM (SELECT 1 FROM generate_series(0, %s) n"
                            " WHERE pg_try_advisory_xact_lock(%s, n) LIMIT 1) taken",
                            [shards - 1, dispatch.ROUND_LOCK_ID],
                        )
                        if not cursor.fetchone()[0]:
                            break  # the three hold every shard
                    if admit_here(lanes=frozenset({"draft"}), prefer=step_id, headroom=shards) is None:
                        break
                singles += 1
        finally:
            release.set()
            for holder in holding:
                holder.join(10)
    assert len(admitted_unseen) == holders and sum(admitted_unseen) > holders  # they did take more
    assert (singles > 0) == (holders == 2)
    assert len(_leased(acme)) == sum(admitted_unseen) + singles <= cap


@pytest.mark.django_db(transaction=True)
def test_a_released_key_goes_to_its_oldest_waiter_in_the_releasing_transaction(acme: Tenant) -> None:
    """A worker finishing a step that held a key admits that key's oldest waiter next, ahead of
    older ready steps of its lanes: the key is handed over as it is released."""
    held = locks_acquire(tenant_id=acme.pk, keys=["crm_contact:7"], holder="the finishing step", ttl=30)
    for _ in range(5):  # older, and first in fair-share order
        run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    waiters = [
        run_start(tenant=acme, workflow="demo.crm_update", input=CRM_INPUT, actor="t").run for _ in range(2)
    ]
    with transaction.atomic():
        locks_release(held)
        admission = admit_here(
            lanes=frozenset({"read", "external"}), released=["crm_contact:7"], tenant_id=acme.pk
        )
    assert admission is not None
    assert admission.step_id == Step.objects.get(run=waiters[0]).pk
    assert Step.objects.get(run=waiters[1]).status == StepStatus.READY  # FIFO: the next one waits


def test_one_named_step_is_a_candidate_exactly_when_a_round_would_find_it(acme: Tenant) -> None:
    """The check of one named step (a worker's next, a key's next holder, an approved step) and
    a round's pass over every ready step apply the same rules — FIFO per key over steps needing
    several keys, waiters not yet due left out of the order, held keys — whatever the mix."""
    chooser = random.Random(19)
    keys = [f"thing:{n}" for n in range(4)]
    now = timezone.now()
    seen: Counter[bool] = Counter()
    for trial in range(25):
        Step.objects.filter(status=StepStatus.READY).update(status=StepStatus.CANCELLED)
        Lease.objects.all().delete()
        runs = [run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run for _ in range(12)]
        for run in runs:
            needs = chooser.sample(keys, chooser.choice([0, 1, 1, 2, 2, 3]))
            later = chooser.random() < 0.2  # a retry waiting for its backoff: not due yet
            Step.objects.filter(run=run).update(
                lock_keys=needs, available_at=now + timedelta(minutes=5) if later else None
            )
        for key in chooser.sample(keys, chooser.choice([0, 0, 1, 2])):
            assert lease_acquire(tenant_id=acme.pk, key=key, holder="elsewhere", ttl=60) is not None
        in_a_round = {c.step_id for c in fair_candidates(limit=1000, now=now)}
        for step in Step.objects.filter(status=StepStatus.READY).order_by("id"):
            named = fair_candidates(limit=1, now=now, only_step=step.pk)
            assert bool(named) == (step.pk in in_a_round), (trial, step.pk, step.lock_keys)
            seen[bool(named)] += 1
    assert seen[True] > 20 and seen[False] > 20, seen  # both answers were put to the test


# The capped crm tool of test.awaits_a_tool, from a workflow of its own: another place.
elsewhere = workflow(
    "test.awaits_a_tool_elsewhere", description="the crm tool, another workflow", input=AwaitInput
)
elsewhere.step(lane="draft", lease_seconds=3, tool="crm")(await_then_notify)
# And from another lane, which the finishing workers (of "draft") do not take from.
other_lane = workflow("test.awaits_a_tool_read", description="the crm tool, lane read", input=AwaitInput)
other_lane.step(lane="read", lease_seconds=3, tool="crm")(await_then_notify)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "waiting",
    [
        "same place",
        "another workflow",
        "another tenant too",
        "another tenant in another lane",
        "leases running out",
    ],
)
def test_workers_finishing_at_a_full_cap_hand_their_place_only_to_a_step_of_the_same_place(
    acme: Tenant, globex: Tenant, waiting: str
) -> None:
    """The cap full, ADMISSION_SHARDS workers each finish a step under a shard of their own and
    all choose at the same instant, none seeing another's choice. A ready step of the finishing
    step's own place (tenant, workflow, lane, tool) takes that place over: every one of them is
    admitted and the cap stays exactly full. A step of another place, counted against the same
    full cap, needs the shards' headroom: none is admitted. Nor is one of the same place while a
    tenant holding less waits first in fair order, in their lane or another: the round gives
    that tenant the place. Nor where the finishing steps' leases are about to run out (another
    reader may already have stopped counting them)."""
    if not rawsql.on_postgresql():
        pytest.skip("PostgreSQL only: SQLite admits one writer at a time, under no shard")
    for tenant in (acme, globex):
        TenantQuota.objects.update_or_create(tenant=tenant, defaults={"max_concurrent_steps": 1000})
    shards = dispatch.ADMISSION_SHARDS
    place = (acme.pk, "test.awaits_a_tool", "draft", "crm")
    with override_settings(RUNWARDEN_CAPS=_tool_caps(SHARD_CAP)):
        _fill_the_tool_cap(acme)
        finishing = sorted(_leased(acme))[:shards]
        workflow = "test.awaits_a_tool_elsewhere" if waiting == "another workflow" else "test.awaits_a_tool"
        for _ in range(shards):
            run_start(tenant=acme, workflow=workflow, input={"wait_seconds": 1}, actor="t")
        if waiting.startswith("another tenant"):  # holding nothing: first in fair order
            first = "test.awaits_a_tool_read" if waiting.endswith("another lane") else "test.awaits_a_tool"
            run_start(tenant=globex, workflow=first, input={"wait_seconds": 1}, actor="t")
        chose = threading.Barrier(shards)

        def finish_and_take_over(n: int) -> dispatch.Admission | None:
            with transaction.atomic():
                with connections["default"].cursor() as cursor:
                    cursor.execute(dispatch.admission_shard_sql())
                step = Step.objects.get(pk=finishing[n])
                lease = Lease.objects.get(pk=step.lease_id)
                Step.objects.filter(pk=step.pk).update(status=StepStatus.SUCCEEDED)
                Lease.objects.filter(pk=lease.pk).update(released_at=timezone.now())
                until = lease.expires_at
                if waiting == "leases running out":
                    until = timezone.now() + timedelta(seconds=1)
                chose.wait(10)  # every thread holds a shard and has released its step
                admitted = admit_here(
                    lanes=frozenset({"draft"}),
                    headroom=dispatch.shard_headroom(),
                    leaving=place,
                    leaving_until=until,
                )
                chose.wait(10)  # none commits before all have chosen
                return admitted

        results = run_concurrently(finish_and_take_over, shards)
        assert not [r for r in results if isinstance(r, BaseException)], results
        admitted = sum(r is not None for r in results)
        assert admitted == (shards if waiting == "same place" else 0)
        assert len(_leased(acme)) == (SHARD_CAP if waiting == "same place" else SHARD_CAP - shards)
        if waiting.startswith("another tenant"):  # the round fills the places exactly, that tenant first
            assert len(dispatch_round()) == shards
            assert len(_leased(globex)) == 1
            assert len(_leased(acme)) + len(_leased(globex)) == SHARD_CAP


@pytest.mark.django_db(transaction=True)
def test_workers_taking_a_full_caps_place_over_with_idle_slots_while_runs_start_finish_every_step(
    acme: Tenant,
) -> None:
    """Workers with idle slots keep finishing steps at a full cap, each taking its place over,
    while another client starts runs of that place one after another: the step taken over may
    have been started after the worker read its own lanes (a bench found it then; taking more
    for the idle slots beside it raised, undoing the finishing step's success until its lease
    ran out). Every finish commits, and the cap is never passed."""
    if not rawsql.on_postgresql():
        pytest.skip("PostgreSQL only: SQLite admits one writer at a time, under no shard")
    # The starter runs until the finishers are done, as fast as starts go: no queue-depth quota stops it.
    TenantQuota.objects.update_or_create(
        tenant=acme, defaults={"max_concurrent_steps": 1000, "max_queue_depth": 1_000_000}
    )
    place = (acme.pk, "test.awaits_a_tool", "draft", "crm")
    finishers, finishes_each = dispatch.ADMISSION_SHARDS, 25
    with override_settings(RUNWARDEN_CAPS=_tool_caps(SHARD_CAP)):
        _fill_the_tool_cap(acme)
        _start_tool_runs(acme, finishers)  # the first finishes have a step of the place to take over
        stop_starting = threading.Event()
        starter_errors: list[BaseException] = []

        def start_runs() -> None:
            try:
                while not stop_starting.is_set():
                    _start_tool_runs(acme, 1)
            except BaseException as error:  # noqa: BLE001 - asserted below
                starter_errors.append(error)
            finally:
                connections.close_all()

        def finish_and_take_over(n: int) -> tuple[int, int]:
            finished = went_on = 0
            deadline = time.monotonic() + 30
            while finished < finishes_each and time.monotonic() < deadline:
                with transaction.atomic():
                    with connections["default"].cursor() as cursor:
                        cursor.execute(dispatch.admission_shard_sql())
                    # One of the leased steps of the place, locked (another finisher skips it).
                    step = (
                        Step.objects.select_for_update(skip_locked=True)
                        .filter(tenant_id=acme.pk, status=StepStatus.LEASED)
                        .order_by("?")
                        .first()
                    )
                    if step is not None:
                        lease = Lease.objects.get(pk=step.lease_id)
                        Step.objects.filter(pk=step.pk).update(status=StepStatus.SUCCEEDED)
                        Lease.objects.filter(pk=lease.pk).update(released_at=timezone.now())
                        admitted = admit_here(
                            lanes=frozenset({"draft"}),
                            headroom=dispatch.shard_headroom(),
                            idle_slots=2,
                            leaving=place,
                            leaving_until=lease.expires_at,
                        )
                        finished += 1
                        went_on += admitted is not None
                if step is None:
                    # Every leased step is another finisher's, or none is left: a starter slower
                    # than the finishers (a loaded machine) let the place run dry once, and with
                    # no dispatcher here nothing admitted again. A round refills the free places,
                    # as the dispatcher's would.
                    with transaction.atomic():
                        dispatch.wait_for_round_lock()
                        admit_here(lanes=frozenset({"draft"}))
                    time.sleep(0.005)
                    continue
                peak = len(_leased(acme))
                assert peak <= SHARD_CAP, peak
            return finished, went_on

        starter = threading.Thread(target=start_runs, daemon=True)
        starter.start()
        try:
            results = run_concurrently(finish_and_take_over, finishers)
        finally:
            stop_starting.set()
            starter.join(30)
    assert not starter.is_alive() and not starter_errors, starter_errors
    assert not [r for r in results if isinstance(r, BaseException)], results
    succeeded = Step.objects.filter(tenant_id=acme.pk, status=StepStatus.SUCCEEDED).count()
    assert succeeded == sum(finished for finished, _ in results)  # every finish committed
    assert succeeded > finishers * finishes_each // 2
    assert sum(went_on for _, went_on in results) >= finishers  # workers went straight on, again and again
    assert Run.objects.filter(tenant=acme).count() > SHARD_CAP + 2 * finishers  # runs kept starting
    assert len(_leased(acme)) <= SHARD_CAP


def _prepared_under(statement: str, *settings_off: str) -> str:
    """``statement`` (as pg_prepared_statements shows it) prepared afresh and planned generically
    with ``settings_off`` off: its plan."""
    name = "under_" + "_".join(settings_off)
    off = "".join(f"SET LOCAL {setting} = off; " for setting in settings_off)
    with connections["default"].cursor() as cursor:
        cursor.execute(f"PREPARE {name} AS {statement.split(' AS ', 1)[1]}")
        cursor.execute(f"BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; {off}")
        try:
            return _explained(f"EXECUTE {name}(now(), now())")
        finally:
            cursor.execute("COMMIT")


def _explained(execute: str) -> str:
    with connections["default"].cursor() as cursor:
        cursor.execute(f"EXPLAIN {execute}")
        return "\n".join(row[0] for row in cursor.fetchall())


# The plans PostgreSQL keeps for this code's prepared statements.
PLANS = postgresql_only("PostgreSQL's plans of prepared statements")


@PLANS
@pytest.mark.django_db(transaction=True)
def test_the_count_of_admitted_steps_keeps_a_plan_without_bitmap_scans(
    acme: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step leaves a dead index entry per status it passed through. Without statistics (a new
    database, autovacuum off or behind) PostgreSQL plans the admission's count of admitted
    steps as a bitmap scan, which reads every dead entry's table page on every admission; the
    plan it keeps is a plain index scan, and the setting is back to its default afterwards,
    inside the admission's transaction too."""
    monkeypatch.setattr(rawsql, "FIRST_REPLAN", 1)  # the second count is prepared (and planned) again
    run = Run.objects.create(tenant=acme, workflow="t.history", actor="test", input={})
    template = Step.objects.create(run=run, tenant=acme, key="s0", position=0, lane="read")
    columns = ", ".join(
        field.column for field in Step._meta.concrete_fields if field.column not in ("id", "key", "position")
    )
    with connections["default"].cursor() as cursor:  # 3,000 steps of history, as real ones leave it
        cursor.execute(
            f"INSERT INTO runs_step (key, position, {columns}) SELECT 's' || n, n, {columns}"
            " FROM runs_step, generate_series(1, 3000) n WHERE id = %s",
            [template.pk],
        )
        for status in (StepStatus.LEASED, StepStatus.RUNNING, StepStatus.SUCCEEDED):
            cursor.execute("UPDATE runs_step SET status = %s WHERE run_id = %s", [status, run.pk])
    connections["default"].close()  # a connection of its own, nothing prepared on it
    try:
        with rawsql.prepared_statements():
            dispatch.load_room(timezone.now())  # outside a transaction: the session plans generically
            with transaction.atomic():
                dispatch.load_room(timezone.now())  # prepared and planned again, as an admission does
                with connections["default"].cursor() as cursor:
                    cursor.execute("SHOW enable_bitmapscan")
                    assert cursor.fetchone() == ("on",)
            with connections["default"].cursor() as cursor:
                cursor.execute(
                    "SELECT name, statement FROM pg_prepared_statements WHERE statement LIKE %s",
                    ["%JOIN core_lease l ON l.id = s.lease_id%"],
                )
                ((name, statement),) = cursor.fetchall()
            # The premise: the same statement prepared plainly is planned as a bitmap scan.
            assert "Bitmap Heap Scan on runs_step" in _prepared_under(statement)
            kept = _explained(f"EXECUTE {name}(now(), now())")
            assert "Bitmap" not in kept and "Index Scan using step_status_tenant on runs_step" in kept
    finally:
        connections["default"].close()


@PLANS
@pytest.mark.django_db(transaction=True)
def test_the_count_of_admitted_steps_keeps_a_plan_by_index_on_tables_never_analyzed(acme: Tenant) -> None:
    """Planned while the tables are nearly empty and have no statistics (a new database, before
    autovacuum first analyzes it), the admission's count of admitted steps would read every lease
    and, for each live one, every step. The plan it keeps reads the admitted steps through the
    index of their status and each one's lease and run by primary key, without JIT compilation
    (which sequential scans off would otherwise bring on at every execution), and the settings
    are back to their defaults afterwards."""
    connections["default"].close()  # a connection of its own, nothing prepared on it
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SHOW jit")
            (jit_before,) = cursor.fetchone()
            cursor.execute("SELECT pg_jit_available()")
            (jit_available,) = cursor.fetchone()
        with rawsql.prepared_statements():
            with transaction.atomic():
                dispatch.load_room(timezone.now())  # prepared (and planned) inside an admission's transaction
                with connections["default"].cursor() as cursor:
                    cursor.execute("SHOW enable_seqscan")
                    assert cursor.fetchone() == ("on",)
                    cursor.execute("SHOW jit")
                    assert cursor.fetchone() == (jit_before,)
            with connections["default"].cursor() as cursor:
                cursor.execute(
                    "SELECT name, statement FROM pg_prepared_statements WHERE statement LIKE %s",
                    ["%JOIN core_lease l ON l.id = s.lease_id%"],
                )
                ((name, statement),) = cursor.fetchall()
                cursor.execute(
                    "SELECT count(*) FROM pg_stats WHERE tablename IN ('runs_step', 'core_lease')"
                    " UNION ALL SELECT current_setting('server_version_num')::int"
                )
                (analyzed,), (version,) = cursor.fetchall()
            # The premises (where the tables have no statistics, as a new database): planned with
            # bitmap scans off alone, it reads the leases whole and, for each live one, the steps
            # whole; with sequential scans off too, PostgreSQL before 18 (which costs a disabled
            # scan so high) JIT-compiles it.
            if not analyzed:
                without_bitmaps = _prepared_under(statement, "enable_bitmapscan")
                assert "Seq Scan on core_lease" in without_bitmaps
                assert "Seq Scan on runs_step" in without_bitmaps
            if jit_available and jit_before == "on" and version < 180000:
                assert "JIT:" in _prepared_under(statement, "enable_bitmapscan", "enable_seqscan")
            kept = _explained(f"EXECUTE {name}(now(), now())")
            assert "Seq Scan on runs_step" not in kept and "Seq Scan on core_lease" not in kept
            assert "Index Scan using step_status_tenant on runs_step" in kept
            assert "Index Scan using core_lease_pkey on core_lease" in kept
            assert "Index Scan using runs_run_pkey on runs_run" in kept  # not every run by its status
            assert "JIT:" not in kept
    finally:
        connections["default"].close()


keyed_noop = workflow("test.keyed_noop", description="one step holding two entity keys")


@keyed_noop.step(lane="read", locks=["thing:1", "thing:2"])
def hold_two(ctx: StepContext) -> dict[str, Any]:
    return {}


class KeyPair(pydantic.BaseModel):
    a: int
    b: int


keyed_pair = workflow(
    "test.keyed_pair", description="one step holding two entity keys of its input", input=KeyPair
)


@keyed_pair.step(lane="read", locks=["thing:{a}", "thing:{b}"])
def hold_pair(ctx: StepContext) -> dict[str, Any]:
    return {}


def _clear_marks() -> None:
    wakeups.mark_left_waiting(False)
    wakeups.mark_waiting(False)
    woken()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "after",
    ["same_place", "another_tenant", "nothing", "a_session_run", "a_keyed_run", "two_keys_two_waiters"],
)
def test_a_runs_last_step_wakes_the_dispatcher_for_its_room_unless_its_worker_took_that_very_place(
    acme: Tenant, after: str
) -> None:
    """The room a run's last step frees (its caps, its worker slot, its session place) may let
    a step left waiting by the last round go: the dispatcher is woken for it, unless the
    worker's own next step took that very place (same tenant, workflow, lane and tool: no cap
    or slot has more room than before) and the run had no session. Its entity keys need no
    round where the worker handed its one waiter both keys; where each key has a waiter of its
    own, the one it did not take needs a round."""
    if not rawsql.on_postgresql() or get_redis() is None:
        pytest.skip("a worker's own admission knows its place on PostgreSQL; wake-ups go through Redis")
    session = {"session_key": "conversation-1"} if after == "a_session_run" else {}
    workflow_name = {"a_keyed_run": "test.keyed_noop", "two_keys_two_waiters": "test.keyed_pair"}.get(
        after, "bench.noop"
    )
    inputs = (
        [{"a": 1, "b": 2}, {"a": 1, "b": 3}, {"a": 2, "b": 4}]
        if after == "two_keys_two_waiters"
        else [{}] * 2
    )
    first = run_start(tenant=acme, workflow=workflow_name, input=inputs[0], actor="t", **session).run
    [admission] = dispatch_round(limit=1)  # a round: a session's run is let in first
    assert admission.step_id == Step.objects.get(run=first).pk
    if after != "nothing":
        other = make_tenant("elsewhere", "Elsewhere") if after == "another_tenant" else acme
        for later in inputs[1:]:
            run_start(tenant=other, workflow=workflow_name, input=later, actor="t")
    started = executor._start(admission.step_id, admission.token)
    assert started.ctx is not None
    wakeups.mark_left_waiting(True)  # the last round left steps waiting for room
    woken()
    try:
        outcome, follow = executor._finish_succeeded(started.ctx, {}, frozenset({"read"}))
        assert outcome == "succeeded" and (follow is not None) == (after != "nothing")
        if after in ("same_place", "a_session_run", "a_keyed_run", "two_keys_two_waiters"):
            assert isinstance(follow, executor._Start) and follow.ctx is not None
            assert follow.ctx.run.workflow == workflow_name and follow.ctx.step.tenant_id == acme.pk
            assert follow.ctx.run.input == inputs[1]  # the oldest waiter of the first key
        assert woken() == (after not in ("same_place", "a_keyed_run"))
    finally:
        _clear_marks()


def _started_pair(tenant: Tenant, a: int, b: int) -> executor._Start:
    """A test.keyed_pair run admitted by a round and started: its step holds both keys."""
    run = run_start(tenant=tenant, workflow="test.keyed_pair", input={"a": a, "b": b}, actor="t").run
    [admission] = dispatch_round(limit=1)
    assert admission.step_id == Step.objects.get(run=run).pk
    started = executor._start(admission.step_id, admission.token)
    assert started.ctx is not None
    return started


@pytest.mark.django_db(transaction=True)
def test_a_start_behind_a_held_key_wakes_no_round_and_its_holder_hands_the_key_on(acme: Tenant) -> None:
    """A run whose first step waits for a key held elsewhere needs no round: the start marks
    steps as waiting (so any other release of the key wakes a round) and the key's holder
    hands it on as it finishes. A key free, or its lease row being changed as the start
    commits, wakes a round as before."""
    if not rawsql.on_postgresql() or get_redis() is None:
        pytest.skip("the start's look at the key's lease is PostgreSQL's; the marks are Redis's")
    client = get_redis()
    assert client is not None
    wakeups.mark_waiting(False, saturated=set())
    _clear_marks()
    holder = _started_pair(acme, 1, 2)
    woken()
    before = int(wakeups.waiters_added() or 0)
    try:
        waiter = run_start(tenant=acme, workflow="test.keyed_pair", input={"a": 1, "b": 3}, actor="t").run
        assert not woken()
        assert int(wakeups.waiters_added() or 0) == before + 1
        assert client.exists(wakeups.WAITING_KEY) and client.exists(wakeups.LEFT_WAITING_KEY)
        run_start(tenant=acme, workflow="test.keyed_pair", input={"a": 5, "b": 6}, actor="t")
        assert woken()  # its keys are free: a round admits it

        being_released = "SELECT id FROM core_lease WHERE tenant_id = %s AND key = 'thing:2' FOR UPDATE"
        with held_meanwhile(being_released, [acme.pk]):
            # Both its keys held, one of them (thing:2) with its row being changed: not known
            # to wait for it, a round decides.
            run_start(tenant=acme, workflow="test.keyed_pair", input={"a": 1, "b": 2}, actor="t")
            assert woken()
        assert holder.ctx is not None
        outcome, follow = executor._finish_succeeded(holder.ctx, {}, frozenset({"read"}))
        assert outcome == "succeeded"
        assert (
            isinstance(follow, executor._Start) and follow.ctx is not None and follow.ctx.run_id == waiter.pk
        )
    finally:
        _clear_marks()


@pytest.mark.django_db(transaction=True)
def test_a_start_that_found_its_key_held_wakes_a_round_if_the_key_was_freed_before_its_marks(
    acme: Tenant,
) -> None:
    """A release that commits between the start's commit and its waiting marks saw no mark and
    woke nothing (a failure, a cancel): the start reads the key again once the marks are set,
    and wakes a round where it is free by then."""
    if not rawsql.on_postgresql() or get_redis() is None:
        pytest.skip("the start's look at the key's lease is PostgreSQL's; the marks are Redis's")
    wakeups.mark_waiting(False, saturated=set())
    _clear_marks()
    waiting = Step(tenant_id=acme.pk, lock_keys=["thing:1"], lock_policy="wait", lane="read")
    grant = lease_acquire(tenant_id=acme.pk, key="thing:1", holder="elsewhere", ttl=60)
    assert grant is not None
    try:
        locking.wake_for_ready_step(waiting, found_held=True)
        assert not woken()  # still held: its holder hands it on, or the marks wake a round
        lease_release(grant=grant)
        locking.wake_for_ready_step(waiting, found_held=True)
        assert woken()
    finally:
        _clear_marks()


@pytest.mark.django_db(transaction=True)
def test_a_keys_release_waits_for_a_start_that_found_it_held_and_hands_it_that_step(acme: Tenant) -> None:
    """The start that found a key held keeps the key's lease row share-locked until it commits:
    the holder's release, which locks that row first, waits for it — and then sees the new
    step as the key's waiter and hands it the key. (Read without the lock, the release could
    commit unaware of a step that started waiting as it did, and no round would be woken.)"""
    if not rawsql.on_postgresql():
        pytest.skip("row locks on lease rows are PostgreSQL's")
    holder = _started_pair(acme, 1, 2)
    assert holder.ctx is not None
    found_held = threading.Event()
    blocked = threading.Event()
    started: list[str] = []

    def start_behind_the_key() -> None:
        try:
            with transaction.atomic():
                wanted = Step(tenant_id=acme.pk, lock_keys=["thing:1"], lock_policy="wait")
                sql, params = locking.held_key_share_sql(wanted, timezone.now())
                with connections["default"].cursor() as cursor:
                    cursor.execute(f"SELECT {sql}", params)
                    assert cursor.fetchone() == (True,)
                found_held.set()
                blocked.wait(10)  # the holder's release now waits for this transaction
                run = run_start(
                    tenant=acme, workflow="test.keyed_pair", input={"a": 1, "b": 3}, actor="t"
                ).run
                started.append(run.pk)
        finally:
            connections.close_all()

    results: list[Any] = []

    def finish() -> None:
        try:
            assert holder.ctx is not None
            results.append(executor._finish_succeeded(holder.ctx, {}, frozenset({"read"})))
        finally:
            connections.close_all()

    starter = threading.Thread(target=start_behind_the_key)
    starter.start()
    assert found_held.wait(30)
    finisher = threading.Thread(target=finish)
    finisher.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not blocked.is_set():
            with connections["default"].cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
                if cursor.fetchone()[0]:
                    blocked.set()
            time.sleep(0.01)
    finally:
        blocked.set()
        starter.join(30)
        finisher.join(30)
    [(outcome, follow)] = results
    assert outcome == "succeeded" and started
    assert isinstance(follow, executor._Start) and follow.ctx is not None and follow.ctx.run_id == started[0]


@pytest.mark.django_db(transaction=True)
def test_a_start_racing_its_keys_release_is_handed_the_key_or_wakes_a_round(acme: Tenant) -> None:
    """A key's holder finishes while a run that waits for that key starts, over many trials:
    whichever commits first, the new step is never left with neither — its holder hands it the
    key, or a round is woken for it."""
    if not rawsql.on_postgresql() or get_redis() is None:
        pytest.skip("the start's look at the key's lease is PostgreSQL's; the marks are Redis's")
    wakeups.mark_waiting(False, saturated=set())
    for trial in range(12):
        holder = _started_pair(acme, 100 + trial, 200 + trial)
        assert holder.ctx is not None
        ctx = holder.ctx
        _clear_marks()

        def act(i: int, ctx: StepContext = ctx, trial: int = trial) -> Any:
            if i == 0:
                return executor._finish_succeeded(ctx, {}, frozenset({"read"}))
            pair = {"a": 100 + trial, "b": 300 + trial}
            return run_start(tenant=acme, workflow="test.keyed_pair", input=pair, actor="t").run

        try:
            (outcome, follow), waiter = run_concurrently(act, 2)
            assert outcome == "succeeded" and isinstance(waiter, Run)
            handed = (
                isinstance(follow, executor._Start)
                and follow.ctx is not None
                and follow.ctx.run_id == waiter.pk
            )
            assert handed or woken(), (
                f"trial {trial}: the waiting step was neither handed its key nor woken for"
            )
            if follow is not None:
                assert isinstance(follow, executor._Start) and follow.ctx is not None
                executor._finish_succeeded(follow.ctx, {}, frozenset())  # its keys free for the next trial
        finally:
            _clear_marks()
        pump()  # a waiter left to a round runs now
    assert set(Run.objects.filter(workflow="test.keyed_pair").values_list("status", flat=True)) == {
        RunStatus.SUCCEEDED
    }


@pytest.mark.django_db(transaction=True)
def test_a_worker_pulling_takes_the_first_step_no_other_admission_holds_in_one_statement(
    acme: Tenant,
) -> None:
    """Workers finishing at once see the same oldest ready steps. A pull tries them all in one
    statement: the first whose row no other admission has locked, still ready, is granted; one
    whose entity key is held elsewhere is passed over for the next, its grants given back."""
    if not rawsql.on_postgresql():
        pytest.skip("SKIP LOCKED over several steps is PostgreSQL's")
    for _ in range(2):
        run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    run_start(tenant=acme, workflow="demo.crm_update", input=CRM_INPUT, actor="t")
    run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
    now = timezone.now()
    by_workflow: dict[str, list[Any]] = {}
    for candidate in fair_candidates(limit=10, now=now):
        by_workflow.setdefault(candidate.workflow, []).append(candidate)
    (held_row, free_row, after_key), (keyed,) = by_workflow["bench.noop"], by_workflow["demo.crm_update"]
    another_admission = "SELECT id FROM runs_step WHERE id = %s FOR NO KEY UPDATE"
    with held_meanwhile(another_admission, [held_row.step_id]):
        with transaction.atomic(), CaptureQueriesContext(connections["default"]) as queries:
            first = dispatch._admit_first([held_row, free_row], now)
        assert first is not None and first[0] == free_row and first[1].step_id == free_row.step_id
        assert len([q for q in queries if "FOR NO KEY UPDATE SKIP LOCKED" in q["sql"]]) == 1
        key = lease_acquire(tenant_id=acme.pk, key="crm_contact:7", holder="elsewhere", ttl=60)
        assert key is not None
        with transaction.atomic():
            second = dispatch._admit_first([held_row, keyed, after_key], now)
        assert second is not None and second[0] == after_key
        assert Step.objects.get(pk=keyed.step_id).status == StepStatus.READY
        assert _live_leases(acme) == {
            (f"step:{free_row.step_id}", first[1].token),
            (f"step:{after_key.step_id}", second[1].token),
            ("crm_contact:7", key.token),
        }
    assert Step.objects.get(pk=held_row.step_id).status == StepStatus.READY


@pytest.mark.django_db(transaction=True)
def test_a_round_says_whether_it_left_a_due_step_and_when_the_next_backoff_ends(acme: Tenant) -> None:
    runs = [run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run for _ in range(3)]
    later = timezone.now() + timedelta(seconds=30)
    Step.objects.filter(run=runs[2]).update(available_at=later)  # backing off after a failure
    first = dispatch.admit_round(limit=1)
    assert [a.step_id for a in first.admitted] == [Step.objects.get(run=runs[0]).pk]
    assert first.waiting  # the second run's step is due and was left for the next round
    assert first.next_due == later
    second = dispatch.admit_round(limit=1)
    assert [a.step_id for a in second.admitted] == [Step.objects.get(run=runs[1]).pk]
    assert not second.waiting  # only the step backing off is left
    assert second.next_due == later


@pytest.mark.django_db(transaction=True)
def test_a_round_counts_a_step_it_left_as_waiting_only_where_its_lane_has_a_free_slot(acme: Tenant) -> None:
    """A step left in a lane whose slots are all taken waits for no round (the lane's workers
    pull it as they finish); one left in a lane with a free slot (here: its key is held) does."""
    pool_announce(name="test-read@host", queues=["read"], slots=1)
    pool_announce(name="test-draft@host", queues=["draft"], slots=5)
    held = locks_acquire(tenant_id=acme.pk, keys=["bench_key:1"], holder="another run", ttl=30)
    try:
        for _ in range(2):
            run_start(tenant=acme, workflow="bench.noop", input={}, actor="t")
        left_in_a_full_lane = dispatch.admit_round()
        assert len(left_in_a_full_lane.admitted) == 1  # the read lane's one slot
        assert not left_in_a_full_lane.waiting
        run_start(tenant=acme, workflow="bench.keyed", input={"key": 1}, actor="t")
        left_for_a_key = dispatch.admit_round()
        assert left_for_a_key.admitted == [] and left_for_a_key.waiting
    finally:
        locks_release(held)
        pool_withdraw("test-read@host")
        pool_withdraw("test-draft@host")
