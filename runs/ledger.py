"""The side-effect ledger: a step's effect on the outside world happens at most once per
idempotency key, and a retry or replay gets the recorded result back. A step's checkpoint
(the progress a take-over resumes from) is recorded here too, fenced the same way."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone
from opentelemetry.trace import Span

from core import coordination, metrics, rawsql, tallies, tracing
from core.leases import LeaseGrant, fenced_write, lease_fence, live_leases_filter
from core.models import Lease
from core.validation import fingerprint
from runs.interrupts import StepInterrupted
from runs.locking import step_row_lock
from runs.models import EffectStatus, Run, SideEffect, Step

logger = logging.getLogger(__name__)


class EffectError(Exception):
    pass


class EffectRequestMismatch(EffectError):
    """The idempotency key was used before for a different request."""


class EffectNotStarted(EffectError):
    """Recorded as the failure of a claimed effect whose call never started (its step was
    stopped in between): it did not happen, so a retry sends it."""


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
        live_leases_filter(now), pk=effect.proposer_lease_id, token=effect.proposer_token
    ).exists()


def _propose(
    *,
    key: str,
    tenant_id: int,
    run: Run | None,
    step: Step | None,
    kind: str,
    request: dict[str, Any],
    request_fingerprint: str,
    lease: LeaseGrant | None,
) -> tuple[SideEffect, bool]:
    """Insert the ``proposed`` row, or find the one a racing caller inserted first."""
    fields = {
        "tenant_id": tenant_id,
        "run": run,
        "step": step,
        "kind": kind,
        "request": request,
        "request_fingerprint": request_fingerprint,
        "proposer_lease_id": lease.id if lease else None,
        "proposer_token": lease.token if lease else None,
        "context": run.contract(attempt=step.attempt if step else None) if run else {},
    }
    if not rawsql.on_postgresql():
        return SideEffect.objects.get_or_create(idempotency_key=key, defaults=fields)
    # One statement where the key is new, as nearly every effect's is: the ORM's get_or_create
    # reads first and inserts under a savepoint, four round trips. A key taken meanwhile (by a
    # racing proposer, whose insert this one waits for) inserts nothing: its row is read then.
    effect = SideEffect(idempotency_key=key, **fields)
    insert, params = rawsql.insert_sql([effect])
    inserted = rawsql.fetch_rows(
        f"{insert.strip().removesuffix(';')} ON CONFLICT (idempotency_key) DO NOTHING RETURNING id", params
    )
    if not inserted:
        return SideEffect.objects.get(idempotency_key=key), False
    effect.pk = inserted[0][0]
    return effect, True


# What stops an effect's call from outside (a soft time limit, a lost lease or a cancelled run
# noticed by a heartbeat inside it): it may have happened, so it is never recorded as failed.
INTERRUPTIONS = (SoftTimeLimitExceeded, StepInterrupted)


def refuse_inside_transaction() -> None:
    """An effect's proposal must commit before it runs: never inside the caller's transaction."""
    if transaction.get_connection().in_atomic_block:
        raise RuntimeError(
            "effect_execute must not run inside a transaction (the proposal must commit first)"
        )


@dataclass(frozen=True)
class EffectClaim:
    """A proposal this caller owns: it runs the effect, then settles it (``effect_settle``)."""

    effect: SideEffect
    kind: str
    key: str
    proposer_token: int | None
    external_ref: Callable[[Any], str] | None


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
    guard: Callable[[], None] | None = None,
) -> EffectOutcome:
    """Run ``fn`` at most once per idempotency key, through the ledger.

    1. The ``proposed`` row is committed *before* ``fn`` runs, so a crash afterwards leaves an
       ambiguous record rather than a silent second execution.
    2. Whoever inserts the row runs ``fn``; everyone else gets the recorded result (committed),
       EffectUnresolved (proposed), or becomes the runner of a retry (failed, claimed by a
       conditional UPDATE so only one retrier wins).
    3. The outcome is recorded with a conditional UPDATE on ``status='proposed'``.

    ``guard`` runs in the transaction that writes the proposal; if it raises, nothing is
    proposed and ``fn`` does not run (the approval gate checks the approved version there).

    Must not be called inside a transaction: the proposal has to be durable before ``fn``.
    (An async step runs the same three parts with its awaited ``fn`` between them:
    ``runs.context.AsyncStepContext.effect``.)
    """
    refuse_inside_transaction()  # here: the caller's own connection is the one that matters
    with effect_span(kind) as span:
        # The ledger's writes where this process does its database work (core.coordination);
        # ``fn`` runs here, on the caller's thread.
        claimed = coordination.run(
            effect_claim,
            run=run,
            step=step,
            kind=kind,
            request=request,
            idempotency_key=idempotency_key,
            lease=lease,
            external_ref=external_ref,
            guard=guard,
        )
        effect_traced(span, claimed)
        if isinstance(claimed, EffectOutcome):
            return claimed
        try:
            with metrics.EFFECT_LATENCY_SECONDS.labels(kind=kind).time():
                result = fn()
        except INTERRUPTIONS:
            raise  # interrupted, not refused: it may have happened, so it stays proposed (ambiguous)
        except Exception as exc:
            coordination.run(effect_settle_failed, claimed, exc)
            raise
        outcome = coordination.run(effect_settle, claimed, result)
        effect_traced(span, outcome)
        return outcome


def effect_span(kind: str) -> AbstractContextManager[Span]:
    """The span of one effect, inside its step's (core.tracing): ``effect_traced`` tells it
    the key, whether the ledger answered (dedupe hit) or the call was made (miss), and the
    provider's reference."""
    return tracing.child_span(f"effect {kind}", {"runwarden.effect.kind": kind} if tracing.enabled() else {})


def effect_traced(span: Span, state: EffectOutcome | EffectClaim) -> None:
    if not span.is_recording():
        return
    if isinstance(state, EffectClaim):
        span.set_attributes({"runwarden.idempotency_key": state.key, "runwarden.dedupe": "miss"})
        return
    span.set_attributes(
        {
            "runwarden.idempotency_key": state.effect.idempotency_key,
            "runwarden.dedupe": "hit" if state.replayed else "miss",
            "runwarden.external_ref": state.effect.external_ref,
        }
    )


def effect_claim(
    *,
    run: Run | None,
    step: Step | None,
    kind: str,
    request: dict[str, Any] | None = None,
    idempotency_key: str = "",
    lease: LeaseGrant | None = None,
    external_ref: Callable[[Any], str] | None = None,
    guard: Callable[[], None] | None = None,
    tenant_id: int | None = None,
) -> EffectOutcome | EffectClaim:
    """Steps 1 and 2 of ``effect_execute``: the recorded outcome when there is one to replay,
    else the claim this caller now owns and must settle. Raises as ``effect_execute`` does.
    ``run`` None: an agent outside Runwarden (``tenant_id``, and its own key, given)."""
    refuse_inside_transaction()
    if run is None:
        assert tenant_id is not None and idempotency_key, "an outside effect names its tenant and key"
    else:
        tenant_id = run.tenant_id
    key = idempotency_key or f"{run.id if run else '-'}:{step.key if step else '-'}:{kind}"
    request = request or {}
    request_fingerprint = fingerprint(request)
    with transaction.atomic():
        if lease is not None:
            # Fenced: a proposal either commits while its step still owns its lease (so a
            # timeout, a cancel or a take-over that comes after sees it), or not at all.
            lease_fence(tenant_id=lease.tenant_id, key=lease.key, token=lease.token)
        if guard is not None:
            guard()
        effect, created = _propose(
            key=key,
            tenant_id=tenant_id,
            run=run,
            step=step,
            kind=kind,
            request=request,
            request_fingerprint=request_fingerprint,
            lease=lease,
        )
    if not created:
        if effect.request_fingerprint != request_fingerprint:
            raise EffectRequestMismatch(f"idempotency key {key} was used for a different request")
        if effect.status == EffectStatus.COMMITTED:
            metrics.DUPLICATES_SUPPRESSED.labels(kind="effect").inc()
            tallies.tally_add([(effect.tenant_id, tallies.DUPLICATES_SUPPRESSED)])
            return EffectOutcome(effect=effect, result=effect.result, replayed=True)
        if effect.status == EffectStatus.PROPOSED:
            raise EffectUnresolved(effect, in_flight=_proposer_is_live(effect))
        # Failed before: exactly one retrier re-proposes it (fenced, like a first proposal).
        with transaction.atomic():
            if lease is not None:
                lease_fence(tenant_id=lease.tenant_id, key=lease.key, token=lease.token)
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
            if effect.status == EffectStatus.COMMITTED:  # another retrier committed it meanwhile
                metrics.DUPLICATES_SUPPRESSED.labels(kind="effect").inc()
                tallies.tally_add([(effect.tenant_id, tallies.DUPLICATES_SUPPRESSED)])
                logger.info(
                    "effect %s answered from the ledger",
                    kind,
                    extra={"idempotency_key": key, "dedupe": "hit", "effect_kind": kind},
                )
                return EffectOutcome(effect=effect, result=effect.result, replayed=True)
            raise EffectUnresolved(effect, in_flight=_proposer_is_live(effect))

    return EffectClaim(
        effect=effect,
        kind=kind,
        key=key,
        proposer_token=lease.token if lease else None,
        external_ref=external_ref,
    )


def _mine(claim: EffectClaim) -> QuerySet[SideEffect]:
    # Only this proposal's own outcome: a zombie whose effect a reviewer settled meanwhile (or
    # that another proposer re-claimed) records nothing.
    return SideEffect.objects.filter(
        pk=claim.effect.pk, status=EffectStatus.PROPOSED, proposer_token=claim.proposer_token
    )


def effect_settle(claim: EffectClaim, result: Any) -> EffectOutcome:
    """Step 3 of ``effect_execute``: the claimed effect happened; record its result."""
    now = timezone.now()
    ref = claim.external_ref(result) if claim.external_ref else ""
    settled = {"status": EffectStatus.COMMITTED, "result": result, "external_ref": ref, "committed_at": now}
    effect = claim.effect
    if _mine(claim).update(**settled, updated_at=now):
        # What was just written to this claim's own row, as the caller gave it (a replay reads
        # the stored JSON back: its objects' keys in PostgreSQL's order).
        for name, value in {**settled, "updated_at": now}.items():
            setattr(effect, name, value)
    else:
        effect.refresh_from_db()  # settled by someone else meanwhile: what they recorded
    logger.info(
        "effect %s committed",
        claim.kind,
        extra={"idempotency_key": claim.key, "dedupe": "miss", "effect_kind": claim.kind},
    )
    return EffectOutcome(effect=effect, result=result, replayed=False)


def effect_settle_failed(claim: EffectClaim, exc: BaseException) -> None:
    """Step 3 of ``effect_execute`` when the effect raised: it did not happen; a retry sends it
    again under the same key."""
    _mine(claim).update(
        status=EffectStatus.FAILED, error=f"{type(exc).__name__}: {exc}", failed_at=timezone.now()
    )


def effect_confirm_committed(*, effect_id: int, external_ref: str, verified_by: str) -> bool:
    """A reviewer checked with the provider that an ambiguous effect did happen: record it
    committed with the provider's reference, so the step's retry replays it instead of sending
    again. Once, and only from ``proposed`` (a conditional UPDATE); call in the resolving
    transaction."""
    now = timezone.now()
    confirmed = SideEffect.objects.filter(pk=effect_id, status=EffectStatus.PROPOSED).update(
        status=EffectStatus.COMMITTED,
        external_ref=external_ref,
        result={"external_ref": external_ref, "verified_by": verified_by},
        committed_at=now,
        updated_at=now,
    )
    return confirmed == 1


def effect_mark_not_sent(*, effect_id: int, actor: str, note: str = "") -> bool:
    """A reviewer checked with the provider that an ambiguous effect did not happen: record it
    failed, so the step's retry sends it again under the same idempotency key. Once, and only
    from ``proposed`` (a conditional UPDATE); call in the resolving transaction."""
    now = timezone.now()
    marked = SideEffect.objects.filter(pk=effect_id, status=EffectStatus.PROPOSED).update(
        status=EffectStatus.FAILED, error=f"marked not sent by {actor}: {note}", failed_at=now, updated_at=now
    )
    return marked == 1


def step_checkpoint(*, step: Step, lease: LeaseGrant, data: Any) -> None:
    """Save a step's progress, only while its lease is live (a fenced write). The step's row is
    locked before its lease (runs/locking.py), as a cancel takes them."""
    with fenced_write(
        tenant_id=step.tenant_id,
        key=lease.key,
        token=lease.token,
        actor=f"step:{step.pk}",
        prelude_sql=step_row_lock(step.pk),
    ):
        Step.objects.filter(pk=step.pk).update(checkpoint=data, updated_at=timezone.now())
