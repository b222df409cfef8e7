"""Writes of the runs app: starting runs (deduplicated triggers) and the side-effect ledger."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from core import services as core_services
from core.leases import LeaseGrant
from core.models import Lease, Tenant
from runs.models import EffectStatus, Run, SideEffect, Step, TriggerEvent


def fingerprint(value: Any) -> str:
    """A stable hash of a JSON-able value (key order and spacing do not matter)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class TriggerPayloadMismatch(Exception):
    """The trigger id was seen before with a different payload."""

    def __init__(self, trigger_event_id: str, run_id: str) -> None:
        super().__init__(
            f"trigger_event_id {trigger_event_id!r} was already used for run {run_id} with another payload"
        )
        self.trigger_event_id = trigger_event_id
        self.run_id = run_id


@dataclass(frozen=True)
class RunStart:
    run: Run
    created: bool  # False: a duplicate delivery, ``run`` is the one the first delivery made


def run_create(
    *,
    tenant: Tenant,
    workflow: str,
    input: dict[str, Any],
    actor: str,
    correlation_id: str = "",
    trigger_event_id: str = "",
    environment: str = "production",
    build_steps: Callable[[Run], list[Step]] | None = None,
) -> RunStart:
    """Start a run, once per (tenant, trigger_event_id).

    A duplicate delivery returns the existing run (``created`` False). The same id with a
    different payload raises TriggerPayloadMismatch and is recorded as an event. The unique
    constraint decides between racing deliveries: the loser's insert waits for the winner's
    commit, fails, and reads the winner's run.
    """
    payload_fingerprint = fingerprint(
        {"workflow": workflow, "input": input, "correlation_id": correlation_id}
    )
    try:
        with transaction.atomic():
            run = Run.objects.create(
                tenant=tenant,
                workflow=workflow,
                input=input,
                actor=actor,
                correlation_id=correlation_id,
                trigger_event_id=trigger_event_id,
                environment=environment,
            )
            if trigger_event_id:
                TriggerEvent.objects.create(
                    tenant=tenant, trigger_event_id=trigger_event_id, fingerprint=payload_fingerprint, run=run
                )
            if build_steps is not None:
                Step.objects.bulk_create(build_steps(run))
            core_services.event_record(
                tenant=tenant,
                subject=f"run:{run.id}",
                verb="created",
                actor=actor,
                payload={"workflow": workflow, "trigger_event_id": trigger_event_id},
            )
            return RunStart(run=run, created=True)
    except IntegrityError:
        if not trigger_event_id:
            raise
    existing = TriggerEvent.objects.select_related("run").get(
        tenant=tenant, trigger_event_id=trigger_event_id
    )
    if existing.fingerprint != payload_fingerprint:
        with transaction.atomic():
            core_services.event_record(
                tenant=tenant,
                subject=f"run:{existing.run_id}",
                verb="duplicate_trigger_payload",
                actor=actor,
                payload={"trigger_event_id": trigger_event_id, "fingerprint": payload_fingerprint},
            )
        raise TriggerPayloadMismatch(trigger_event_id, existing.run_id)
    return RunStart(run=existing.run, created=False)


class EffectError(Exception):
    pass


class EffectRequestMismatch(EffectError):
    """The idempotency key was used before for a different request."""


class EffectUnresolved(EffectError):
    """A proposed effect has no recorded outcome.

    ``in_flight`` is True while the proposer's lease is live (someone is executing it right
    now); otherwise the effect is ambiguous — it may or may not have happened — and must be
    reviewed, never blindly retried.
    """

    def __init__(self, effect: SideEffect, in_flight: bool) -> None:
        state = "in flight" if in_flight else "ambiguous (proposed, no recorded outcome)"
        super().__init__(f"effect {effect.idempotency_key} is {state}")
        self.effect = effect
        self.in_flight = in_flight


@dataclass(frozen=True)
class EffectOutcome:
    effect: SideEffect
    result: Any
    replayed: bool  # True: the recorded result of an earlier execution, the callable did not run


def _proposer_is_live(effect: SideEffect) -> bool:
    if effect.proposer_lease_id is None or effect.proposer_token is None:
        return False
    now = timezone.now()
    return Lease.objects.filter(
        pk=effect.proposer_lease_id,
        token=effect.proposer_token,
        released_at__isnull=True,
        expires_at__gt=now,
    ).exists()


def effect_execute(
    *,
    run: Run,
    step: Step | None,
    kind: str,
    fn: Callable[[], Any],
    request: dict[str, Any] | None = None,
    idempotency_key: str = "",
    lease: LeaseGrant | None = None,
    external_ref: Callable[[Any], str] | None = None,
) -> EffectOutcome:
    """Run ``fn`` at most once per idempotency key, through the ledger.

    1. The ``proposed`` row is committed *before* ``fn`` runs, so a crash afterwards leaves an
       ambiguous record rather than a silent second execution.
    2. Whoever inserts the row runs ``fn``; everyone else gets the recorded result (committed),
       EffectUnresolved (proposed), or becomes the runner of a retry (failed, claimed by a
       conditional UPDATE so only one retrier wins).
    3. The outcome is recorded with a conditional UPDATE on ``status='proposed'``.

    Must not be called inside a transaction: the proposal has to be durable before ``fn``.
    """
    if transaction.get_connection().in_atomic_block:
        raise RuntimeError(
            "effect_execute must not run inside a transaction (the proposal must commit first)"
        )
    key = idempotency_key or f"{run.id}:{step.key if step else '-'}:{kind}"
    request = request or {}
    request_fingerprint = fingerprint(request)
    effect, created = SideEffect.objects.get_or_create(
        idempotency_key=key,
        defaults={
            "tenant_id": run.tenant_id,
            "run": run,
            "step": step,
            "kind": kind,
            "request": request,
            "request_fingerprint": request_fingerprint,
            "proposer_lease_id": lease.id if lease else None,
            "proposer_token": lease.token if lease else None,
        },
    )
    if not created:
        if effect.request_fingerprint != request_fingerprint:
            raise EffectRequestMismatch(f"idempotency key {key} was used for a different request")
        if effect.status == EffectStatus.COMMITTED:
            return EffectOutcome(effect=effect, result=effect.result, replayed=True)
        if effect.status == EffectStatus.PROPOSED:
            raise EffectUnresolved(effect, in_flight=_proposer_is_live(effect))
        # Failed before: exactly one retrier re-proposes it.
        claimed = SideEffect.objects.filter(pk=effect.pk, status=EffectStatus.FAILED).update(
            status=EffectStatus.PROPOSED,
            attempts=F("attempts") + 1,
            error="",
            proposer_lease_id=lease.id if lease else None,
            proposer_token=lease.token if lease else None,
            updated_at=timezone.now(),
        )
        effect.refresh_from_db()
        if claimed != 1:
            if effect.status == EffectStatus.COMMITTED:
                return EffectOutcome(effect=effect, result=effect.result, replayed=True)
            raise EffectUnresolved(effect, in_flight=_proposer_is_live(effect))

    try:
        result = fn()
    except Exception as exc:
        SideEffect.objects.filter(pk=effect.pk, status=EffectStatus.PROPOSED).update(
            status=EffectStatus.FAILED, error=f"{type(exc).__name__}: {exc}", failed_at=timezone.now()
        )
        raise
    now = timezone.now()
    ref = external_ref(result) if external_ref else ""
    SideEffect.objects.filter(pk=effect.pk, status=EffectStatus.PROPOSED).update(
        status=EffectStatus.COMMITTED, result=result, external_ref=ref, committed_at=now, updated_at=now
    )
    effect.refresh_from_db()
    return EffectOutcome(effect=effect, result=result, replayed=False)
