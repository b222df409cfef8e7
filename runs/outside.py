"""The same guarantees for agents that run outside Runwarden (a LangGraph graph, a TypeScript
service), over the API (``runs/outside_api.py``): entity leases with fencing tokens, and the
side-effect ledger by idempotency key, fenced by a lease's token. The rules are the ones steps
live by (``core.leases``, ``runs.ledger``); this module only names the tenant's records and
refuses what an outside caller may not touch.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from core.leases import (
    LeaseGrant,
    StaleToken,
    lease_acquire,
    leases_release,
    leases_renew,
    live_leases_filter,
)
from core.models import Lease
from runs.ledger import EffectClaim, EffectOutcome, effect_claim, effect_settle, effect_settle_failed
from runs.models import EffectStatus, SideEffect

# Keys the engine's own leases use: a step's lease, a governed call's slot under a cap.
RESERVED_PREFIXES = ("step:", "toolcall:")


class OutsideRefused(Exception):
    """What an outside caller asked for cannot be done as asked (a reserved key, an effect
    that is not its to settle); nothing changed."""


class LeaseTaken(Exception):
    """Someone else holds the key now."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"{lease.key} is held by {lease.holder} until {lease.expires_at.isoformat()}")
        self.lease = lease


def key_check(key: str) -> None:
    if key.startswith(RESERVED_PREFIXES):
        raise OutsideRefused(f"keys starting with {' or '.join(RESERVED_PREFIXES)} are the engine's own")


def outside_lease_acquire(*, tenant_id: int, key: str, holder: str, ttl: float) -> LeaseGrant:
    """The key's lease for ``holder``, with a fencing token higher than any before; LeaseTaken
    while someone else's lease on it is live."""
    key_check(key)
    # Named apart from the engine's holders ("<run id>:<step key>"), which the wait-for graph reads.
    holder = f"outside:{holder}"
    grant = lease_acquire(tenant_id=tenant_id, key=key, holder=holder, ttl=ttl, metadata={"outside": holder})
    if grant is None:
        live = Lease.objects.filter(live_leases_filter(), tenant_id=tenant_id, key=key).first()
        if live is None:  # it ran out in the instant between: ask again
            return outside_lease_acquire(tenant_id=tenant_id, key=key, holder=holder, ttl=ttl)
        raise LeaseTaken(live)
    return grant


def outside_lease(*, tenant_id: int, key: str, token: int) -> LeaseGrant:
    """The live lease ``token`` holds on ``key``; StaleToken when it expired, was released or
    was taken over (a write with it is refused)."""
    key_check(key)
    lease = Lease.objects.filter(live_leases_filter(), tenant_id=tenant_id, key=key, token=token).first()
    if lease is None:
        raise StaleToken(key, token)
    return LeaseGrant(lease.pk, tenant_id, key, token, lease.acquired_at, lease.expires_at)


def outside_lease_renew(*, tenant_id: int, key: str, token: int, ttl: float) -> LeaseGrant:
    return leases_renew(grants=[outside_lease(tenant_id=tenant_id, key=key, token=token)], ttl=ttl)[0]


def outside_lease_release(*, tenant_id: int, key: str, token: int) -> None:
    if leases_release([outside_lease(tenant_id=tenant_id, key=key, token=token)]) != 1:
        raise StaleToken(key, token)


def stored_key(tenant_id: int, key: str) -> str:
    """An outside caller's idempotency key in the ledger, where keys are global: its tenant's."""
    return f"outside:{tenant_id}:{key}"


def outside_effect_claim(
    *,
    tenant_id: int,
    key: str,
    kind: str,
    request: dict[str, Any],
    lease_key: str = "",
    token: int | None = None,
) -> EffectOutcome | EffectClaim:
    """Propose the effect under ``key`` (the ledger's step 1 and 2): the recorded outcome when
    it happened already, else the claim the caller now owns — it acts, then settles. With a
    lease (``lease_key`` and ``token``), the proposal commits only while the lease is the
    caller's: a stale token is refused (StaleToken), nothing proposed."""
    lease = None
    if lease_key:
        if token is None:
            raise OutsideRefused("a lease_key needs the token it was granted with")
        lease = outside_lease(tenant_id=tenant_id, key=lease_key, token=token)
    return effect_claim(
        run=None,
        step=None,
        kind=kind,
        request=request,
        idempotency_key=stored_key(tenant_id, key),
        lease=lease,
        tenant_id=tenant_id,
    )


def outside_effect_settle(
    *,
    tenant_id: int,
    key: str,
    token: int | None,
    outcome: str,
    result: Any = None,
    external_ref: str = "",
    error: str = "",
) -> SideEffect:
    """Record what happened to a claimed effect (``committed`` with its result, or ``failed``:
    it did not happen and may be claimed again), once, by its proposer (the token it proposed
    with). OutsideRefused when it is not proposed, or not this caller's."""
    with transaction.atomic():
        effect = (
            SideEffect.objects.select_for_update()
            .filter(tenant_id=tenant_id, idempotency_key=stored_key(tenant_id, key))
            .first()
        )
        if effect is None:
            raise OutsideRefused(f"no effect {key!r} was proposed")
        if effect.status != EffectStatus.PROPOSED or effect.proposer_token != token:
            raise OutsideRefused(
                f"effect {key!r} is {effect.status}"
                + ("" if effect.status != EffectStatus.PROPOSED else ", proposed under another lease token")
            )
        claim = EffectClaim(
            effect=effect,
            kind=effect.kind,
            key=effect.idempotency_key,
            proposer_token=token,
            external_ref=(lambda _: external_ref) if external_ref else None,
        )
        if outcome == "committed":
            return effect_settle(claim, result).effect
        effect_settle_failed(claim, RuntimeError(error or "failed, as its caller reported"))
        effect.refresh_from_db()
        return effect
