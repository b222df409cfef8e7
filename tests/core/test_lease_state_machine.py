from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from core.leases import LeaseGrant, StaleToken, lease_acquire, lease_fence, lease_release, lease_renew
from core.models import Lease, Tenant

pytestmark = pytest.mark.both_dialects

HOLDERS = st.sampled_from(["a", "b", "c"])
TTL = 10.0


class LeaseMachine(RuleBasedStateMachine):
    """Drives one key through acquire / renew / expire / take-over / release / fenced writes on
    the real database, against a model of who should own it, with a controlled clock."""

    tenant_id: int

    def __init__(self) -> None:
        super().__init__()
        self.key = f"sm:{uuid.uuid4()}"
        self.now: datetime = timezone.now()
        self.grants: dict[str, LeaseGrant] = {}  # the latest grant each holder received
        self.owner: str | None = None  # the model's live owner
        self.owner_expires: datetime | None = None
        self.tokens: list[int] = []

    def _model_owner(self) -> str | None:
        if self.owner is not None and self.owner_expires is not None and self.now < self.owner_expires:
            return self.owner
        return None

    @rule(holder=HOLDERS)
    def acquire(self, holder: str) -> None:
        expected = self._model_owner() is None
        grant = lease_acquire(tenant_id=self.tenant_id, key=self.key, holder=holder, ttl=TTL, now=self.now)
        assert (grant is not None) == expected
        if grant is not None:
            assert not self.tokens or grant.token > self.tokens[-1], "tokens must rise across take-overs"
            self.tokens.append(grant.token)
            self.grants[holder] = grant
            self.owner, self.owner_expires = holder, grant.expires_at

    @rule(holder=HOLDERS)
    def renew(self, holder: str) -> None:
        grant = self.grants.get(holder)
        if grant is None:
            return
        should_work = self._model_owner() == holder and grant.token == self.tokens[-1]
        try:
            self.grants[holder] = lease_renew(grant=grant, ttl=TTL, now=self.now)
            assert should_work, "a holder that lost its lease renewed it"
            self.owner_expires = self.grants[holder].expires_at
        except StaleToken:
            assert not should_work, "the live holder could not renew"

    @rule(holder=HOLDERS)
    def release(self, holder: str) -> None:
        grant = self.grants.get(holder)
        if grant is None:
            return
        is_current = self.owner == holder and grant.token == self.tokens[-1]
        released = lease_release(grant=grant, now=self.now)
        # Releasing an expired (not yet taken over) lease is allowed; a stale token is not.
        assert released == (is_current and self.owner is not None)
        if released:
            self.owner, self.owner_expires = None, None

    @rule(seconds=st.floats(min_value=0, max_value=2 * TTL))
    def advance_clock(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(holder=HOLDERS)
    def fenced_write(self, holder: str) -> None:
        grant = self.grants.get(holder)
        if grant is None:
            return
        should_work = self._model_owner() == holder and grant.token == self.tokens[-1]
        try:
            with transaction.atomic():
                lease_fence(tenant_id=self.tenant_id, key=self.key, token=grant.token, now=self.now)
            assert should_work, "a fenced-out token was allowed to write"
        except StaleToken:
            assert not should_work, "the live holder's write was refused"

    @invariant()
    def database_agrees_with_the_model(self) -> None:
        row = Lease.objects.filter(tenant_id=self.tenant_id, key=self.key).first()
        live = row is not None and row.released_at is None and row.expires_at > self.now
        assert live == (self._model_owner() is not None)
        if live:
            assert row is not None
            assert row.holder == self._model_owner()
            assert row.token == self.tokens[-1]


@pytest.mark.django_db
def test_the_lease_state_machine_keeps_its_invariants(acme: Tenant) -> None:
    LeaseMachine.tenant_id = acme.pk
    run_state_machine_as_test(
        LeaseMachine, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )
