from __future__ import annotations

import threading
import time

import pytest

from core.leases import (
    LeaseHeld,
    LockPolicy,
    LockTimeout,
    StaleToken,
    lease_renew,
    locks_acquire,
    locks_release,
)
from core.models import Event, Lease, Tenant
from tests.concurrency import run_concurrently
from tests.dialects import RACING_THREADS

pytestmark = pytest.mark.both_dialects


@pytest.mark.django_db
def test_locks_are_all_or_nothing(acme: Tenant) -> None:
    held = locks_acquire(tenant_id=acme.pk, keys=["B"], holder="other", ttl=30)
    with pytest.raises(LeaseHeld):
        locks_acquire(tenant_id=acme.pk, keys=["A", "B"], holder="me", ttl=30, policy=LockPolicy.SKIP)
    assert not Lease.objects.filter(key="A").exists(), "A must not stay locked when B could not be had"
    locks_release(held)
    grants = locks_acquire(
        tenant_id=acme.pk, keys=["B", "A", "A"], holder="me", ttl=30, policy=LockPolicy.SKIP
    )
    assert [g.key for g in grants] == ["A", "B"]


@pytest.mark.django_db
def test_cancel_newest_refuses_the_newcomer(acme: Tenant) -> None:
    locks_acquire(tenant_id=acme.pk, keys=["A"], holder="first", ttl=30)
    with pytest.raises(LeaseHeld):
        locks_acquire(tenant_id=acme.pk, keys=["A"], holder="second", ttl=30, policy=LockPolicy.CANCEL_NEWEST)
    assert Lease.objects.get(key="A").holder == "first"


@pytest.mark.django_db
def test_cancel_in_progress_takes_over_and_fences_the_old_holder(acme: Tenant) -> None:
    [old] = locks_acquire(tenant_id=acme.pk, keys=["A"], holder="first", ttl=30)
    [new] = locks_acquire(
        tenant_id=acme.pk, keys=["A"], holder="second", ttl=30, policy=LockPolicy.CANCEL_IN_PROGRESS
    )
    assert new.token > old.token
    with pytest.raises(StaleToken):
        lease_renew(grant=old, ttl=30)
    assert Event.objects.filter(verb="locks_preempted", actor="second").exists()


@pytest.mark.django_db
def test_wait_gives_up_after_its_timeout(acme: Tenant) -> None:
    locks_acquire(tenant_id=acme.pk, keys=["A"], holder="first", ttl=30)
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        locks_acquire(tenant_id=acme.pk, keys=["A"], holder="second", ttl=30, wait_timeout=0.3)
    assert time.monotonic() - started >= 0.3


@pytest.mark.django_db
def test_an_unknown_policy_is_refused(acme: Tenant) -> None:
    with pytest.raises(ValueError, match="unknown lock policy"):
        locks_acquire(tenant_id=acme.pk, keys=["A"], holder="x", ttl=30, policy="yolo")


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_opposite_lock_orders_never_deadlock_and_never_overlap(acme: Tenant) -> None:
    # Two steps want {A, B} and {B, A}; each takes both many times. None may hang, and their
    # critical sections must never overlap.
    rounds = 60
    intervals: list[tuple[float, float, int]] = []
    record = threading.Lock()

    def step(i: int) -> int:
        keys = ["A", "B"] if i % 2 == 0 else ["B", "A"]
        for _ in range(rounds):
            grants = locks_acquire(tenant_id=acme.pk, keys=keys, holder=f"step{i}", ttl=10, wait_timeout=60)
            start = time.monotonic()
            time.sleep(0.001)
            end = time.monotonic()
            with record:
                intervals.append((start, end, i))
            locks_release(grants)
        return rounds

    results = run_concurrently(step, 4, timeout=170)
    assert results == [rounds] * 4, results
    ordered = sorted(intervals)
    for (_, e1, a), (s2, _, b) in zip(ordered, ordered[1:], strict=False):
        assert s2 >= e1, f"steps {a} and {b} held A and B at the same time"
