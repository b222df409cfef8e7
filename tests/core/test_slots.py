from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from django.db import connections
from django.test import override_settings
from django.utils import timezone

from core.leases import StaleToken, lease_acquire, lease_release, lease_renew
from core.models import Tenant, TenantQuota
from core.slots import NoRoom, Scope, admission_scopes, live_seat_counts, slots_claim
from tests.concurrency import run_concurrently


def grant_for(tenant: Tenant, ttl: float = 30, now=None):  # type: ignore[no-untyped-def]
    grant = lease_acquire(tenant_id=tenant.pk, key=f"step:{uuid.uuid4()}", holder="w", ttl=ttl, now=now)
    assert grant is not None
    return grant


@pytest.mark.django_db
def test_admission_takes_a_seat_in_every_scope_or_none(acme: Tenant) -> None:
    tight, roomy = Scope("tool:crm", 1), Scope("tenant:t", 5)
    slots_claim(grant=grant_for(acme), scopes=[tight, roomy])
    with pytest.raises(NoRoom) as refused:
        slots_claim(grant=grant_for(acme), scopes=[tight, roomy])
    assert refused.value.scope == "tool:crm"
    assert live_seat_counts() == {"tenant:t": 1, "tool:crm": 1}


@pytest.mark.django_db
def test_release_frees_the_seats(acme: Tenant) -> None:
    grant = grant_for(acme)
    slots_claim(grant=grant, scopes=[Scope("global", 1)])
    lease_release(grant=grant)
    assert live_seat_counts() == {}
    slots_claim(grant=grant_for(acme), scopes=[Scope("global", 1)])


@pytest.mark.django_db
def test_a_crashed_holders_seat_frees_itself_when_its_lease_expires(acme: Tenant) -> None:
    now = timezone.now()
    crashed = grant_for(acme, ttl=5, now=now)
    slots_claim(grant=crashed, scopes=[Scope("global", 1)], now=now)
    with pytest.raises(NoRoom):
        slots_claim(
            grant=grant_for(acme, now=now), scopes=[Scope("global", 1)], now=now + timedelta(seconds=4)
        )
    # Nobody released anything; the seat went with the lease.
    later = now + timedelta(seconds=6)
    assert live_seat_counts(now=later) == {}
    slots_claim(grant=grant_for(acme, now=later), scopes=[Scope("global", 1)], now=later)


@pytest.mark.django_db
def test_renewing_the_lease_keeps_the_seat_and_a_zombie_cannot(acme: Tenant) -> None:
    now = timezone.now()
    holder = grant_for(acme, ttl=5, now=now)
    slots_claim(grant=holder, scopes=[Scope("global", 1)], now=now)
    lease_renew(grant=holder, ttl=5, now=now + timedelta(seconds=4))
    with pytest.raises(NoRoom):
        slots_claim(
            grant=grant_for(acme, now=now), scopes=[Scope("global", 1)], now=now + timedelta(seconds=7)
        )
    # The lease runs out; a newcomer takes the seat; the old holder's renew is refused and
    # does not extend the newcomer's seat either.
    later = now + timedelta(seconds=10)
    newcomer = grant_for(acme, ttl=5, now=later)
    slots_claim(grant=newcomer, scopes=[Scope("global", 1)], now=later)
    with pytest.raises(StaleToken):
        lease_renew(grant=holder, ttl=60, now=later)
    assert live_seat_counts(now=later + timedelta(seconds=6)) == {}


@pytest.mark.django_db
def test_lowering_a_cap_admits_nobody_until_the_seats_above_it_drain(acme: Tenant) -> None:
    holders = [grant_for(acme) for _ in range(3)]
    for grant in holders:
        slots_claim(grant=grant, scopes=[Scope("tool:x", 3)])
    lease_release(grant=holders[0])  # seat 0 is free, seats 1 and 2 are held
    with pytest.raises(NoRoom):
        slots_claim(grant=grant_for(acme), scopes=[Scope("tool:x", 2)])
    lease_release(grant=holders[2])  # nothing held at or above the new cap any more
    slots_claim(grant=grant_for(acme), scopes=[Scope("tool:x", 2)])
    assert live_seat_counts() == {"tool:x": 2}


@pytest.mark.django_db
@override_settings(
    RUNWARDEN_CAPS={
        "global": 7,
        "tenant_default": 4,
        "workflow": {"demo.crm_update": 2},
        "lane": {"external": 3},
        "tool": {"crm": 1},
    }
)
def test_admission_scopes_read_settings_and_the_tenant_quota(acme: Tenant) -> None:
    TenantQuota.objects.filter(tenant=acme).update(max_concurrent_steps=2)
    scopes = admission_scopes(tenant_id=acme.pk, workflow="demo.crm_update", lane="external", tool="crm")
    assert scopes == [
        Scope("global", 7),
        Scope(f"tenant:{acme.pk}", 2),
        Scope("workflow:demo.crm_update", 2),
        Scope("lane:external", 3),
        Scope("tool:crm", 1),
    ]
    assert admission_scopes(tenant_id=acme.pk, workflow="other", lane="read") == [
        Scope("global", 7),
        Scope(f"tenant:{acme.pk}", 2),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_a_storm_of_admissions_never_exceeds_any_cap_and_leaves_nothing_held(acme: Tenant) -> None:
    caps = {"global:storm": 5, "tenant:storm": 3, "tool:crm": 2, "tool:mail": 4}
    per_thread = 25
    inside: dict[str, int] = dict.fromkeys(caps, 0)
    max_inside: dict[str, int] = dict.fromkeys(caps, 0)
    max_sampled: dict[str, int] = dict.fromkeys(caps, 0)
    lock = threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        # Another connection watches the seats while the storm runs.
        try:
            while not stop.is_set():
                for scope, count in live_seat_counts(caps).items():
                    max_sampled[scope] = max(max_sampled[scope], count)
                time.sleep(0.002)
        finally:
            connections.close_all()

    def admit(i: int) -> int:
        tool = "tool:crm" if i % 2 else "tool:mail"
        scopes = [Scope("global:storm", 5), Scope("tenant:storm", 3), Scope(tool, caps[tool])]
        admitted = 0
        while admitted < per_thread:
            grant = grant_for(acme)
            try:
                slots_claim(grant=grant, scopes=scopes)
            except NoRoom:
                lease_release(grant=grant)
                time.sleep(0.001)
                continue
            with lock:
                for scope in scopes:
                    inside[scope.name] += 1
                    max_inside[scope.name] = max(max_inside[scope.name], inside[scope.name])
            time.sleep(0.002)
            with lock:
                for scope in scopes:
                    inside[scope.name] -= 1
            lease_release(grant=grant)
            admitted += 1
        return admitted

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = run_concurrently(admit, 12, timeout=230)
    finally:
        stop.set()
        sampler.join(10)
    assert results == [per_thread] * 12, results
    for scope, cap in caps.items():
        assert max_inside[scope] <= cap, f"{scope}: {max_inside[scope]} admitted at once, cap {cap}"
        assert max_sampled[scope] <= cap, f"{scope}: {max_sampled[scope]} seats held at once, cap {cap}"
    # The storm really pressed against the caps (else the test proves nothing).
    assert max_inside["tenant:storm"] == caps["tenant:storm"]
    assert max_sampled["tenant:storm"] >= 2
    assert live_seat_counts(caps) == {}
