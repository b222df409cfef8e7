"""The API for agents that run outside Runwarden (``runs.outside``): entity leases with fencing
tokens, and the side-effect ledger by idempotency key. Operators' tokens (an agent acts for its
tenant as an operator would); the tenant is named in ``tenant`` when the token's user belongs
to several. The Python client is ``runwarden.client``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Field, Router, Schema, Status

from core.api import ApiError, InputSchema
from core.leases import LeaseGrant, StaleToken
from core.validation import unstorable_values
from runs import outside
from runs.api import tenant_to_act_in
from runs.ledger import EffectOutcome, EffectRequestMismatch, EffectUnresolved
from runs.models import SideEffect

router = Router(tags=["outside agents"])

Key = Field(min_length=1, max_length=200, description="an entity key, e.g. crm_contact:42")
IdempotencyKey = Field(min_length=1, max_length=200, description="the effect's key, stable across retries")
Ttl = Field(default=30.0, ge=0.5, le=3600, description="seconds the lease lives unless renewed")


class LeaseIn(InputSchema):
    tenant: str = ""
    key: str = Key
    holder: str = Field(
        min_length=1, max_length=192, description="who holds it, for the board (shown as outside:<holder>)"
    )
    ttl_seconds: float = Ttl


class LeaseTokenIn(InputSchema):
    tenant: str = ""
    key: str = Key
    token: int = Field(description="the fencing token the lease was granted with")
    ttl_seconds: float = Ttl


class LeaseOut(Schema):
    key: str
    token: int = Field(
        description="fencing token: higher than any earlier holder's; send it with every write"
    )
    expires_at: datetime


class EffectIn(InputSchema):
    tenant: str = ""
    idempotency_key: str = IdempotencyKey
    kind: str = Field(min_length=1, max_length=100, description="what it does, e.g. payments.refund")
    request: dict[str, Any] = Field(
        default_factory=dict, description="what it will send; the same key with another request is refused"
    )
    lease_key: str = Field(default="", max_length=200, description="fence the proposal with this lease...")
    token: int | None = Field(default=None, description="...and its token: a stale one is refused")


class EffectOutcomeIn(InputSchema):
    tenant: str = ""
    idempotency_key: str = IdempotencyKey
    outcome: str = Field(
        pattern="^(committed|failed)$", description="committed (it happened) or failed (it did not)"
    )
    result: Any = Field(default=None, description="what the provider answered (committed)")
    external_ref: str = Field(default="", max_length=300, description="the provider's reference (committed)")
    error: str = Field(default="", max_length=2000, description="why it did not happen (failed)")
    token: int | None = Field(default=None, description="the lease token it was proposed under, if any")


class EffectOut(Schema):
    idempotency_key: str
    status: str = Field(description="proposed: it is yours to perform, then report; committed: it happened")
    replayed: bool = Field(description="true: answered from the ledger; do not act again")
    result: Any = None
    external_ref: str = ""


def _lease(grant: LeaseGrant) -> dict[str, Any]:
    return {"key": grant.key, "token": grant.token, "expires_at": grant.expires_at}


def _stale(exc: StaleToken) -> ApiError:
    return ApiError(
        409,
        "stale_token",
        f"Token {exc.token} no longer holds {exc.key} (it expired, was released or taken over): "
        "the write was refused. Acquire the lease again and re-read before writing.",
        {"key": exc.key, "token": exc.token},
    )


def _effect_out(key: str, effect: SideEffect, *, replayed: bool) -> dict[str, Any]:
    """An effect as the caller knows it: by its own key (the ledger's is the tenant's)."""
    return {
        "idempotency_key": key,
        "status": effect.status,
        "replayed": replayed,
        "result": effect.result,
        "external_ref": effect.external_ref,
    }


def _storable(field: str, value: Any) -> None:
    """A nested value PostgreSQL would refuse (a NUL character, NaN): 422 naming where."""
    refused = unstorable_values(value, (field,))
    if refused:
        raise ApiError(422, "invalid_input", "The request does not fit its schema.", {"fields": refused})


def _refused(exc: Exception) -> ApiError:
    return ApiError(409, "refused", str(exc))


@router.post("/leases/acquire", response={201: LeaseOut})
def lease_acquire(request: HttpRequest, payload: LeaseIn) -> Status[dict[str, Any]]:
    """Take an entity lease; 409 ``lease_held`` (with who holds it, until when) while it is taken."""
    tenant = tenant_to_act_in(request, payload.tenant)
    try:
        grant = outside.outside_lease_acquire(
            tenant_id=tenant.pk, key=payload.key, holder=payload.holder, ttl=payload.ttl_seconds
        )
    except outside.LeaseTaken as taken:
        raise ApiError(
            409,
            "lease_held",
            str(taken),
            {"holder": taken.lease.holder, "expires_at": taken.lease.expires_at.isoformat()},
        ) from None
    except outside.OutsideRefused as exc:
        raise ApiError(400, "reserved_key", str(exc)) from None
    return Status(201, _lease(grant))


@router.post("/leases/renew", response=LeaseOut)
def lease_renew(request: HttpRequest, payload: LeaseTokenIn) -> dict[str, Any]:
    """Extend a lease the token still holds; 409 ``stale_token`` when it no longer does."""
    tenant = tenant_to_act_in(request, payload.tenant)
    try:
        return _lease(
            outside.outside_lease_renew(
                tenant_id=tenant.pk, key=payload.key, token=payload.token, ttl=payload.ttl_seconds
            )
        )
    except StaleToken as exc:
        raise _stale(exc) from None
    except outside.OutsideRefused as exc:
        raise ApiError(400, "reserved_key", str(exc)) from None


@router.post("/leases/release", response={204: None})
def lease_release(request: HttpRequest, payload: LeaseTokenIn) -> Status[None]:
    tenant = tenant_to_act_in(request, payload.tenant)
    try:
        outside.outside_lease_release(tenant_id=tenant.pk, key=payload.key, token=payload.token)
    except StaleToken as exc:
        raise _stale(exc) from None
    except outside.OutsideRefused as exc:
        raise ApiError(400, "reserved_key", str(exc)) from None
    return Status(204, None)


@router.post("/effects", response={200: EffectOut, 201: EffectOut})
def effect_propose(request: HttpRequest, payload: EffectIn) -> Status[dict[str, Any]]:
    """Propose an effect before performing it (the ledger's rule: proposed is recorded first).
    201 ``proposed``: perform it, then report its outcome. 200 ``committed``: it happened
    already, here is its result; do not act again. 409 ``effect_in_flight`` (its proposer is
    still at it), ``effect_ambiguous`` (a proposer vanished mid-way: a human must check),
    ``stale_token``; 422 ``idempotency_key_reused`` for another request."""
    tenant = tenant_to_act_in(request, payload.tenant)
    _storable("request", payload.request)
    if bool(payload.lease_key) != (payload.token is not None):
        raise ApiError(400, "invalid_request", "send lease_key and token together, or neither")
    try:
        claimed = outside.outside_effect_claim(
            tenant_id=tenant.pk,
            key=payload.idempotency_key,
            kind=payload.kind,
            request=payload.request,
            lease_key=payload.lease_key,
            token=payload.token,
        )
    except StaleToken as exc:
        raise _stale(exc) from None
    except outside.OutsideRefused as exc:
        raise ApiError(400, "reserved_key", str(exc)) from None
    except EffectRequestMismatch as exc:
        raise ApiError(422, "idempotency_key_reused", str(exc)) from None
    except EffectUnresolved as exc:
        code = "effect_in_flight" if exc.in_flight else "effect_ambiguous"
        raise ApiError(
            409, code, str(exc).replace(exc.effect.idempotency_key, payload.idempotency_key)
        ) from None
    if isinstance(claimed, EffectOutcome):
        return Status(200, _effect_out(payload.idempotency_key, claimed.effect, replayed=True))
    return Status(201, {"idempotency_key": payload.idempotency_key, "status": "proposed", "replayed": False})


@router.post("/effects/outcome", response=EffectOut)
def effect_outcome(request: HttpRequest, payload: EffectOutcomeIn) -> dict[str, Any]:
    """Report what happened to an effect you proposed: once, with the token you proposed it
    under; 409 ``refused`` when it is not proposed, or not yours."""
    tenant = tenant_to_act_in(request, payload.tenant)
    _storable("result", payload.result)
    try:
        effect = outside.outside_effect_settle(
            tenant_id=tenant.pk,
            key=payload.idempotency_key,
            token=payload.token,
            outcome=payload.outcome,
            result=payload.result,
            external_ref=payload.external_ref,
            error=payload.error,
        )
    except outside.OutsideRefused as exc:
        raise _refused(exc) from None
    return _effect_out(payload.idempotency_key, effect, replayed=False)
