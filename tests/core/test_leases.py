from __future__ import annotations

import threading
import time
import uuid
from contextlib import nullcontext
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.leases import (
    Fence,
    LeaseGrant,
    LeaseRequest,
    StaleToken,
    fenced_write,
    lease_acquire,
    lease_fence,
    lease_release,
    lease_renew,
    lease_revoke,
    leases_acquire_many,
    leases_renew,
    leases_renew_many,
)
from core.models import Event, Lease, Tenant
from tests.concurrency import run_concurrently
from tests.dialects import ON_SQLITE, RACING_THREADS, postgresql_only

pytestmark = pytest.mark.both_dialects


def take_over(expired: LeaseGrant, holder: str) -> LeaseGrant:
    """Once ``expired`` has run out (waiting for its own expiry, not a guessed sleep), take its
    key for ``holder``; a take-over blocked behind a fenced write waits for that write."""
    while timezone.now() < expired.expires_at:
        time.sleep(0.005)
    deadline = time.monotonic() + 10
    while True:
        grant = lease_acquire(tenant_id=expired.tenant_id, key=expired.key, holder=holder, ttl=30)
        if grant is not None:
            return grant
        assert time.monotonic() < deadline, f"{expired.key} was never free to take over"


@pytest.mark.django_db
def test_a_held_key_is_refused_and_a_released_one_is_granted_with_a_larger_token(acme: Tenant) -> None:
    first = lease_acquire(tenant_id=acme.pk, key="crm_contact:1", holder="a", ttl=30)
    assert first is not None
    assert lease_acquire(tenant_id=acme.pk, key="crm_contact:1", holder="b", ttl=30) is None
    assert lease_release(grant=first)
    second = lease_acquire(tenant_id=acme.pk, key="crm_contact:1", holder="b", ttl=30)
    assert second is not None
    assert second.token > first.token
    assert not lease_release(grant=first), "an old token cannot release the new holder's lease"


@pytest.mark.django_db
def test_an_expired_lease_is_taken_over_and_its_holder_is_fenced_out(acme: Tenant) -> None:
    now = timezone.now()
    old = lease_acquire(tenant_id=acme.pk, key="k", holder="a", ttl=5, now=now)
    assert old is not None
    assert (
        lease_acquire(tenant_id=acme.pk, key="k", holder="b", ttl=5, now=now + timedelta(seconds=4)) is None
    )
    later = now + timedelta(seconds=6)
    new = lease_acquire(tenant_id=acme.pk, key="k", holder="b", ttl=5, now=later)
    assert new is not None and new.token > old.token
    with pytest.raises(StaleToken):
        lease_renew(grant=old, ttl=5, now=later)
    with pytest.raises(StaleToken), transaction.atomic():
        lease_fence(tenant_id=acme.pk, key="k", token=old.token, now=later)
    with transaction.atomic():
        lease_fence(tenant_id=acme.pk, key="k", token=new.token, now=later)


@pytest.mark.django_db
def test_an_expired_holder_cannot_renew_even_before_anyone_takes_over(acme: Tenant) -> None:
    now = timezone.now()
    grant = lease_acquire(tenant_id=acme.pk, key="k", holder="a", ttl=5, now=now)
    assert grant is not None
    with pytest.raises(StaleToken):
        lease_renew(grant=grant, ttl=5, now=now + timedelta(seconds=5))


@pytest.mark.django_db
def test_renewing_extends_the_lease(acme: Tenant) -> None:
    now = timezone.now()
    grant = lease_acquire(tenant_id=acme.pk, key="k", holder="a", ttl=5, now=now)
    assert grant is not None
    renewed = lease_renew(grant=grant, ttl=5, now=now + timedelta(seconds=4))
    assert renewed.expires_at == now + timedelta(seconds=9)
    assert (
        lease_acquire(tenant_id=acme.pk, key="k", holder="b", ttl=5, now=now + timedelta(seconds=7)) is None
    )


@pytest.mark.django_db
def test_many_holders_renew_in_one_statement_and_a_lost_one_is_told_alone(acme: Tenant) -> None:
    now = timezone.now()

    def held(key: str, ttl: float) -> LeaseGrant:
        grant = lease_acquire(tenant_id=acme.pk, key=key, holder=key, ttl=ttl, now=now)
        assert grant is not None
        return grant

    # Three steps: one with an entity lock too, one with a longer lease, one whose lock expired.
    first = [held("step:1", 5), held("contact:1", 5)]
    second = [held("step:2", 20)]
    third = [held("step:3", 5), held("contact:3", 1)]
    later = now + timedelta(seconds=4)
    with CaptureQueriesContext(connection) as queries:
        leases_renew_many([(first, 5), (second, 20)], now=later)
    assert len(queries.captured_queries) == 1, "all held: one statement"
    with CaptureQueriesContext(connection) as queries:
        renewed = leases_renew_many([(first, 5), (second, 20), (third, 5)], now=later)
    assert len(queries.captured_queries) == 2, "and a read of whether the one not renewed is held"
    assert renewed[2] is None, "its lock ran out: it is told, and only it"
    assert [g.expires_at for g in renewed[0] or []] == [later + timedelta(seconds=5)] * 2
    assert [g.expires_at for g in renewed[1] or []] == [later + timedelta(seconds=20)]
    stored = dict(Lease.objects.values_list("key", "expires_at"))
    assert stored["step:1"] == stored["contact:1"] == later + timedelta(seconds=5)
    assert stored["step:2"] == later + timedelta(seconds=20)
    assert leases_renew_many([], now=later) == []


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_a_renewal_passes_over_a_lease_a_fenced_write_holds_and_never_waits_for_it(acme: Tenant) -> None:
    # A step's fenced write locks its own lease, then its entity locks by id; a renewal that
    # waited for the step's lease while holding the entity lock's row would close a cycle as
    # the write reached for that lock (PostgreSQL then aborts one: seen aborting the write).
    # The renewal must come back while the write still holds the step's lease, and the write
    # must then take the entity lock and commit.
    entity = lease_acquire(tenant_id=acme.pk, key="contact:1", holder="step:1", ttl=30)
    own = lease_acquire(tenant_id=acme.pk, key="step:1", holder="step:1", ttl=30)
    assert entity is not None and own is not None
    own_locked, renewal_back = threading.Event(), threading.Event()
    outcome: list[list[LeaseGrant] | None] = []

    def fenced_step_write(_: int) -> None:
        with transaction.atomic():
            lease_fence(tenant_id=acme.pk, key=own.key, token=own.token)
            own_locked.set()
            assert renewal_back.wait(10), "the renewal waited for the lease the write holds"
            lease_fence(tenant_id=acme.pk, key=entity.key, token=entity.token)
            Event.objects.create(tenant=acme, subject="step:1", verb="wrote", actor="step:1", payload={})

    def heartbeat(_: int) -> None:
        assert own_locked.wait(10)
        with transaction.atomic():
            outcome.extend(leases_renew_many([([own, entity], 60)]))
        renewal_back.set()

    results = run_concurrently(lambda i: (fenced_step_write if i == 0 else heartbeat)(i), 2)
    assert results == [None, None], results
    assert Event.objects.filter(subject="step:1", verb="wrote").count() == 1
    [renewed] = outcome
    assert renewed is not None, "a lease passed over is still held: its holder is not told it lost it"
    stored = dict(Lease.objects.values_list("key", "expires_at"))
    assert renewed[0].expires_at == own.expires_at == stored["step:1"], "passed over, as it was"
    assert renewed[1].expires_at == stored["contact:1"] > entity.expires_at, "the free one renewed"
    # Once the write has committed, the next beat renews both.
    again = leases_renew_many([(renewed, 60)])[0]
    assert again is not None and all(grant.expires_at > own.expires_at for grant in again)


@pytest.mark.django_db
def test_fencing_needs_the_transaction_of_the_write(acme: Tenant) -> None:
    grant = lease_acquire(tenant_id=acme.pk, key="k", holder="a", ttl=5)
    assert grant is not None
    # pytest-django wraps the test in a transaction; step outside it to prove the guard.
    connection = transaction.get_connection()
    outer = connection.in_atomic_block
    connection.in_atomic_block = False
    try:
        with pytest.raises(RuntimeError, match="inside the transaction"):
            lease_fence(tenant_id=acme.pk, key="k", token=grant.token)
    finally:
        connection.in_atomic_block = outer


@pytest.mark.django_db
def test_keys_are_per_tenant(acme: Tenant, globex: Tenant) -> None:
    assert lease_acquire(tenant_id=acme.pk, key="crm_contact:1", holder="a", ttl=30) is not None
    assert lease_acquire(tenant_id=globex.pk, key="crm_contact:1", holder="b", ttl=30) is not None


@pytest.mark.django_db(transaction=True)
def test_a_stale_tokens_write_is_refused_and_recorded(acme: Tenant) -> None:
    old = lease_acquire(tenant_id=acme.pk, key="k", holder="zombie", ttl=0.05)
    assert old is not None
    new = take_over(old, holder="fresh")
    with pytest.raises(StaleToken), fenced_write(tenant_id=acme.pk, key="k", token=old.token, actor="zombie"):
        Event.objects.create(tenant=acme, subject="k", verb="zombie_wrote", actor="zombie")
    assert not Event.objects.filter(verb="zombie_wrote").exists()
    refusal = Event.objects.get(verb="stale_token_write")
    assert refusal.payload == {"key": "k", "token": old.token}
    with fenced_write(tenant_id=acme.pk, key="k", token=new.token, actor="fresh"):
        Event.objects.create(tenant=acme, subject="k", verb="fresh_wrote", actor="fresh")
    assert Event.objects.filter(verb="fresh_wrote").count() == 1


def _event_carrying(fence: Fence, tenant: Tenant, verb: str) -> None:
    """An event written by a statement that carries ``fence``, as a step's end does."""
    carried = fence.in_write()
    first, first_params = carried.prelude
    with connection.cursor() as cursor:
        cursor.execute(
            f"{first}WITH {carried.ctes}, written AS ("
            " INSERT INTO core_event (tenant_id, subject, verb, actor, payload, created_at)"
            f" SELECT %s, 'k', %s, 'writer', '{{}}'::jsonb, now() WHERE {carried.held}"
            " RETURNING id)"
            f" SELECT {carried.held}, (SELECT count(*) FROM written)",
            [*first_params, *carried.params, tenant.pk, verb],
        )
        held, written = cursor.fetchone()
    fence.confirm(held)
    assert written == 1


@postgresql_only("a fence carried by a write is PostgreSQL's: SQLite checks every fence as it begins")
@pytest.mark.django_db(transaction=True)
def test_a_deferred_fence_is_carried_by_the_first_write_and_refuses_a_stale_token(acme: Tenant) -> None:
    old = lease_acquire(tenant_id=acme.pk, key="k", holder="zombie", ttl=0.05)
    assert old is not None
    new = take_over(old, holder="fresh")
    with (
        pytest.raises(StaleToken),
        fenced_write(tenant_id=acme.pk, key="k", token=old.token, actor="zombie", deferred=True) as fence,
    ):
        assert fence.deferred  # nothing checked yet: the write below carries it
        _event_carrying(fence, acme, "zombie_wrote")
    assert not Event.objects.filter(verb="zombie_wrote").exists()
    assert Event.objects.get(verb="stale_token_write").payload == {"key": "k", "token": old.token}
    with (
        CaptureQueriesContext(connection) as queries,
        fenced_write(tenant_id=acme.pk, key="k", token=new.token, actor="fresh", deferred=True) as fence,
    ):
        _event_carrying(fence, acme, "fresh_wrote")
    assert Event.objects.filter(verb="fresh_wrote").count() == 1
    # The fence cost no round trip of its own: the transaction was the write alone.
    statements = [q["sql"] for q in queries.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]
    assert len(statements) == 1 and "core_lease" in statements[0]


@postgresql_only("a fence carried by a write is PostgreSQL's: SQLite checks every fence as it begins")
@pytest.mark.django_db(transaction=True)
def test_a_deferred_fence_carries_its_entity_locks_and_names_the_one_lost(acme: Tenant) -> None:
    """A step holding entity locks: the write carries the lease and the locks (one statement,
    rows locked lease first, then the locks by id); a lock taken over meanwhile refuses the
    write, and the refusal names that lock."""
    step = lease_acquire(tenant_id=acme.pk, key="k", holder="step", ttl=30)
    locks = [lease_acquire(tenant_id=acme.pk, key=key, holder="step", ttl=30) for key in ("crm:1", "crm:2")]
    assert step is not None and all(locks)
    held = [grant for grant in locks if grant is not None]
    with (
        CaptureQueriesContext(connection) as queries,
        fenced_write(
            tenant_id=acme.pk, key="k", token=step.token, actor="step", also=held, deferred=True
        ) as fence,
    ):
        assert fence.deferred
        _event_carrying(fence, acme, "locked_wrote")
    assert Event.objects.filter(verb="locked_wrote").count() == 1
    statements = [q["sql"] for q in queries.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]
    assert len(statements) == 1 and "fence_also" in statements[0]
    lease_revoke(tenant_id=acme.pk, keys=["crm:2"])  # the lock taken from the step, and taken again
    assert lease_acquire(tenant_id=acme.pk, key="crm:2", holder="another", ttl=30) is not None
    with (
        pytest.raises(StaleToken) as refused,
        fenced_write(
            tenant_id=acme.pk, key="k", token=step.token, actor="step", also=held, deferred=True
        ) as fence,
    ):
        _event_carrying(fence, acme, "lost_lock_wrote")
    assert (refused.value.key, refused.value.token) == ("crm:2", held[1].token)
    assert not Event.objects.filter(verb="lost_lock_wrote").exists()


@pytest.mark.django_db(transaction=True)
def test_a_deferred_fence_that_no_write_carried_commits_nothing(acme: Tenant) -> None:
    grant = lease_acquire(tenant_id=acme.pk, key="k", holder="h", ttl=30)
    assert grant is not None
    deferred = not ON_SQLITE  # SQLite checks every fence as it begins
    with (
        pytest.raises(RuntimeError) if deferred else nullcontext(),
        fenced_write(tenant_id=acme.pk, key="k", token=grant.token, actor="h", deferred=True),
    ):
        Event.objects.create(tenant=acme, subject="k", verb="unfenced", actor="h")
    assert Event.objects.filter(verb="unfenced").exists() is not deferred
    # Checked by hand instead (a write that cannot carry it), it commits.
    with fenced_write(tenant_id=acme.pk, key="k", token=grant.token, actor="h", deferred=True) as fence:
        fence.check()
        Event.objects.create(tenant=acme, subject="k", verb="checked", actor="h")
    assert Event.objects.filter(verb="checked").count() == 1


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_racing_acquirers_get_exactly_one_grant_per_trial(acme: Tenant) -> None:
    threads, trials = 8, 150
    for trial in range(trials):
        key = f"race:{trial}"
        results = run_concurrently(
            lambda i, key=key: lease_acquire(tenant_id=acme.pk, key=key, holder=f"t{i}", ttl=30), threads
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        grants = [r for r in results if r is not None]
        assert len(grants) == 1, f"trial {trial}: {len(grants)} holders"
    assert Lease.objects.filter(key__startswith="race:").count() == trials


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_under_churn_holders_never_overlap_tokens_rise_and_fenced_writes_stay_in_token_order(
    acme: Tenant,
) -> None:
    # Many threads keep grabbing one key with short leases; some oversleep their lease (zombies)
    # and then try to write. Each committed write carries its token: in commit order the tokens
    # must never go down, and no two grants' live intervals may overlap.
    key = f"churn:{uuid.uuid4()}"
    grants: list[LeaseGrant] = []
    record = threading.Lock()
    deadline = time.monotonic() + 6

    def churn(i: int) -> int:
        writes = 0
        while time.monotonic() < deadline:
            grant = lease_acquire(tenant_id=acme.pk, key=key, holder=f"t{i}", ttl=0.03)
            if grant is None:
                time.sleep(0.002)
                continue
            with record:
                grants.append(grant)
            time.sleep(0.045 if i % 3 == 0 else 0.005)  # every third thread turns zombie
            try:
                with fenced_write(tenant_id=acme.pk, key=key, token=grant.token, actor=f"t{i}"):
                    Event.objects.create(
                        tenant=acme, subject=key, verb="wrote", actor=f"t{i}", payload={"t": grant.token}
                    )
                writes += 1
            except StaleToken:
                pass
        return writes

    results = run_concurrently(churn, 6, timeout=60)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sum(results) > 20, "the churn should commit plenty of writes"

    by_token = sorted(grants, key=lambda g: g.token)
    assert len({g.token for g in grants}) == len(grants), "tokens are unique"
    for earlier, later in zip(by_token, by_token[1:], strict=False):
        assert later.acquired_at >= earlier.expires_at, "a take-over happened while a lease was live"

    written = list(
        Event.objects.filter(subject=key, verb="wrote").order_by("id").values_list("payload", flat=True)
    )
    tokens = [p["t"] for p in written]
    assert tokens == sorted(tokens), "a fenced-out holder's write landed after a newer holder's"
    assert Event.objects.filter(subject=key, verb="stale_token_write").exists(), (
        "zombies must have been refused"
    )


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
def test_a_take_over_waits_for_a_fenced_write_already_in_progress(acme: Tenant) -> None:
    # The holder passes the fence, then outlives its lease inside the write's transaction.
    # The newcomer's take-over must wait for that transaction, so the writes stay in token
    # order; without the row lock taken by the fence, the newcomer's write lands first.
    key = "slow-writer"
    old = lease_acquire(tenant_id=acme.pk, key=key, holder="slow", ttl=0.1)
    assert old is not None
    fenced = threading.Event()

    def slow_writer(_: int) -> None:
        with fenced_write(tenant_id=acme.pk, key=key, token=old.token, actor="slow"):
            fenced.set()
            time.sleep(0.4)
            Event.objects.create(
                tenant=acme, subject=key, verb="wrote", actor="slow", payload={"t": old.token}
            )

    def newcomer(_: int) -> None:
        assert fenced.wait(5)
        new = take_over(old, holder="new")
        with fenced_write(tenant_id=acme.pk, key=key, token=new.token, actor="new"):
            Event.objects.create(
                tenant=acme, subject=key, verb="wrote", actor="new", payload={"t": new.token}
            )

    results = run_concurrently(lambda i: (slow_writer if i == 0 else newcomer)(i), 2)
    assert results == [None, None], results
    tokens = list(
        Event.objects.filter(subject=key, verb="wrote").order_by("id").values_list("payload__t", flat=True)
    )
    assert len(tokens) == 2
    assert tokens == sorted(tokens)


def test_a_revoked_lease_cannot_be_renewed_by_a_clock_a_moment_behind(acme: Tenant) -> None:
    now = timezone.now()
    grant = lease_acquire(tenant_id=acme.pk, key="crm_contact:9", holder="w", ttl=30, now=now)
    assert grant is not None
    assert lease_revoke(tenant_id=acme.pk, keys=["crm_contact:9"], now=now) == 1
    # A heartbeat that read its clock just before the revoke must not bring the lease back.
    with pytest.raises(StaleToken):
        leases_renew(grants=[grant], ttl=30, now=now - timedelta(seconds=1))


@pytest.mark.django_db
def test_many_keys_are_granted_in_one_statement_free_or_expired_ones_only(
    acme: Tenant, globex: Tenant
) -> None:
    """A round's grants: every free key of the batch, an expired one taken over with a larger
    token, a live one left out; tokens rise in the requests' order; each key once per call."""
    held = lease_acquire(tenant_id=acme.pk, key="held", holder="other", ttl=30)
    expired = lease_acquire(tenant_id=acme.pk, key="expired", holder="gone", ttl=0.05)
    assert held is not None and expired is not None
    while timezone.now() < expired.expires_at:
        time.sleep(0.005)
    requests = [
        LeaseRequest(acme.pk, key, "round", 30, {"step_key": key})
        for key in ("a-free", "expired", "held", "z-free")
    ] + [LeaseRequest(globex.pk, "held", "round", 30, {})]  # the same key of another tenant is free
    with transaction.atomic():
        grants = leases_acquire_many(requests)
    assert set(grants) == {
        (acme.pk, "a-free"),
        (acme.pk, "expired"),
        (acme.pk, "z-free"),
        (globex.pk, "held"),
    }
    tokens = [grants[(r.tenant_id, r.key)].token for r in requests if (r.tenant_id, r.key) in grants]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert grants[(acme.pk, "expired")].token > expired.token
    taken = Lease.objects.get(tenant_id=acme.pk, key="expired")
    assert (taken.holder, taken.metadata, taken.released_at) == ("round", {"step_key": "expired"}, None)
    assert Lease.objects.get(tenant_id=acme.pk, key="held").token == held.token  # untouched
    assert taken.expires_at > timezone.now() + timedelta(seconds=25)
    with pytest.raises(ValueError, match="once per call"):
        leases_acquire_many([requests[0], requests[0]])
