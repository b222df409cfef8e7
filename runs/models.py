from __future__ import annotations

import os
import time
from typing import Any

from django.db import models

from core.models import Tenant

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, Crockford base32 (sortable by time)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def new_run_id() -> str:
    return f"run_{ulid()}"


class RunStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CONFLICT = "conflict"
    EXPIRED = "expired"


class SessionState(models.TextChoices):
    """Where a run stands in its session ("" for a run without one)."""

    NONE = "", "no session"
    WAITING = "waiting"  # queued behind the session's running runs: holds nothing
    ACTIVE = "active"  # one of the session's ``max_concurrent`` runs, until it finishes
    DONE = "done"  # finished after it ran
    DROPPED = "dropped"  # left the queue without running (cancelled or expired)


# The runs of a session (``runs.sessions``): the only runs ``run_in_session`` indexes. A query of
# a session's runs names this condition too: SQLite uses a partial index only then.
IN_A_SESSION = ~models.Q(session_key="")


class Run(models.Model):
    id = models.CharField(primary_key=True, max_length=40, default=new_run_id, editable=False)
    # Indexed as the first column of run_tenant_status (and the other tenant indexes).
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="runs", db_index=False)
    workflow = models.CharField(max_length=200)
    actor = models.CharField(max_length=200)
    correlation_id = models.CharField(max_length=200, blank=True)
    trigger_event_id = models.CharField(max_length=200, blank=True)
    environment = models.CharField(max_length=64, default="production")
    workflow_version = models.CharField(max_length=40, blank=True)
    session_key = models.CharField(max_length=200, blank=True)
    sequence = models.BigIntegerField(null=True, blank=True)
    session_state = models.CharField(max_length=10, choices=SessionState.choices, blank=True, default="")
    # Resolved from the workflow's session policy at start: how many of the session's runs may
    # run at once, and when this run stops waiting for its turn (None: never).
    session_max = models.PositiveIntegerField(default=1)
    session_gap_seconds = models.FloatField(default=30.0)
    queue_deadline = models.DateTimeField(null=True, blank=True)
    # Indexed by run_replays, on the replays alone.
    replay_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replays", db_index=False
    )
    retries = models.PositiveIntegerField(default=0)
    # Compensation after a failure or cancel: "" (none), running, done, or failed (a
    # compensation is in conflict, waiting for a reviewer).
    compensation = models.CharField(max_length=10, blank=True)
    # The connections bound at start, frozen: {provider: {"id": connection id, "name": ...}}.
    connections = models.JSONField(default=dict, blank=True)
    # The W3C traceparent of the run's start span: every span of the run is its child
    # (core.tracing). Empty when tracing is off.
    traceparent = models.CharField(max_length=55, blank=True, default="")
    input = models.JSONField(default=dict)
    status = models.CharField(max_length=20, choices=RunStatus.choices, default=RunStatus.PENDING)
    # Which of its tenant's queue-depth counters counts the run while it is unfinished
    # (runs/queue_depth.py; kept by a PostgreSQL trigger on status).
    depth_shard = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "status", "id"], name="run_tenant_status"),
            models.Index(fields=["tenant", "correlation_id"], name="run_tenant_correlation"),
            # The overview's last hour: runs started and finished per minute.
            models.Index(fields=["tenant", "created_at"], name="run_tenant_created"),
            # Partial where most runs have nothing to index: every index a run's row is in costs
            # each of its writes (a status move rewrites the row into every one of them).
            models.Index(
                fields=["tenant", "finished_at"],
                name="run_finished_at",
                condition=models.Q(finished_at__isnull=False),
            ),
            models.Index(
                fields=["tenant", "session_key", "id"], name="run_in_session", condition=IN_A_SESSION
            ),
            models.Index(
                fields=["replay_of"], name="run_replays", condition=models.Q(replay_of__isnull=False)
            ),
            models.Index(
                fields=["session_state"],
                name="run_session_waiting",
                condition=models.Q(session_state__in=["waiting", "active"]),
            ),
        ]

    def __str__(self) -> str:
        return self.id

    def contract(self, attempt: int | None = None) -> dict[str, Any]:
        """Who and what a run acts for, stamped on each of its ledger rows: correlation id,
        actor, environment, session, pinned version, bound connections (and the attempt)."""
        return {
            "correlation_id": self.correlation_id,
            "actor": self.actor,
            "environment": self.environment,
            "session_key": self.session_key,
            "workflow_version": self.workflow_version,
            "connections": {
                p: c.get("name") for p, c in (self.connections or {}).items() if isinstance(c, dict)
            },
            **({"attempt": attempt} if attempt is not None else {}),
        }


class StepStatus(models.TextChoices):
    PENDING = "pending"
    READY = "ready"
    LEASED = "leased"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CONFLICT = "conflict"


class Step(models.Model):
    # Indexed as the first column of step_key_unique_in_run.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps", db_index=False)
    # Read with a status (step_status_tenant, step_ready_keyed); alone only when a tenant is
    # deleted (a scan then): an index of its own would cost every write of a step.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+", db_index=False)
    key = models.CharField(max_length=120)
    position = models.PositiveIntegerField()
    lane = models.CharField(max_length=20)
    tool = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=20, choices=StepStatus.choices, default=StepStatus.PENDING)
    attempt = models.PositiveIntegerField(default=0)
    # What an earlier attempt that did not succeed started from (the run's input, the earlier
    # steps' outputs) and its hash: a later attempt on different inputs is refused.
    input_hash = models.CharField(max_length=64, blank=True)
    started_from = models.JSONField(null=True, blank=True)
    output = models.JSONField(null=True, blank=True)
    checkpoint = models.JSONField(null=True, blank=True)
    # Resolved when the step becomes ready (at run start for the first step), so admission
    # never needs the workflow's code: lock keys, their policy and the retry budget.
    lock_keys = models.JSONField(default=list)
    lock_policy = models.CharField(max_length=20, default="wait")
    # A compensation step (key ``compensate:<key>``) names the step it undoes.
    compensates = models.CharField(max_length=100, blank=True)
    # When an operator last retried the run from this step: an approval decided before it
    # (rejected, expired) no longer counts, and the step asks again.
    retried_at = models.DateTimeField(null=True, blank=True)
    max_attempts = models.PositiveIntegerField(default=3)
    error = models.TextField(blank=True)
    # The admission that owns the step: its lease row and token, and its entity locks'
    # leases ([{"id", "key", "token"}]) so the worker can renew and release them.
    lease_id = models.BigIntegerField(null=True, blank=True)
    lease_token = models.BigIntegerField(null=True, blank=True)
    lock_leases = models.JSONField(default=list)
    worker = models.CharField(max_length=200, blank=True)  # host:pid of the attempt's worker
    enqueued_at = models.DateTimeField(null=True, blank=True)
    available_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # The row's last write. Every status move writes it, and nothing else writes a ready step,
    # so for a ready step it is when the step became ready: admission measures a lock wait
    # from it (runs.dispatch's ``ready_since``).
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "key"], name="step_key_unique_in_run"),
            models.UniqueConstraint(fields=["run", "position"], name="step_position_unique_in_run"),
        ]
        indexes = [
            models.Index(fields=["status", "tenant", "id"], name="step_status_tenant"),
            # The ready steps that wait in line for entity keys: admission finds the head of
            # every key's line from these alone (runs.dispatch.fair_candidates).
            models.Index(
                fields=["tenant", "id"],
                name="step_ready_keyed",
                condition=models.Q(status="ready") & ~models.Q(lock_keys=[]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.run_id}:{self.key}"


class QueueDepth(models.Model):
    """A tenant's unfinished runs, counted on ``runs.queue_depth.SHARDS`` rows so that starts of
    one tenant need not queue on one row: each start locks one row (runs/queue_depth.py). The
    counts are kept by a PostgreSQL trigger on runs_run (insert, status change, delete), so
    every path that moves a run keeps them; ``check_invariants`` compares them with the runs."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+", db_index=False)
    shard = models.PositiveSmallIntegerField()
    unfinished = models.IntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "shard"], name="queue_depth_tenant_shard")]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.shard}: {self.unfinished}"


class TriggerEvent(models.Model):
    """One delivery id per tenant: a duplicate delivery returns the run the first one made."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    trigger_event_id = models.CharField(max_length=200)
    fingerprint = models.CharField(max_length=64)
    run = models.OneToOneField(Run, on_delete=models.CASCADE, related_name="trigger")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "trigger_event_id"], name="trigger_event_unique_per_tenant"
            )
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.trigger_event_id}"


class EffectStatus(models.TextChoices):
    PROPOSED = "proposed"
    COMMITTED = "committed"
    FAILED = "failed"


class SideEffect(models.Model):
    """The side-effect ledger. A committed key is never executed again; a proposed key with no
    outcome whose proposer is gone is ambiguous (did it happen?) and goes to review."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    # None for an agent outside Runwarden recording its effects over the API (runs.outside).
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="effects", null=True, blank=True)
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="effects", null=True, blank=True)
    kind = models.CharField(max_length=100)
    idempotency_key = models.CharField(max_length=300, unique=True)
    status = models.CharField(max_length=16, choices=EffectStatus.choices, default=EffectStatus.PROPOSED)
    request_fingerprint = models.CharField(max_length=64)
    request = models.JSONField(default=dict)
    context = models.JSONField(default=dict, blank=True)  # Run.contract() when proposed
    result = models.JSONField(null=True, blank=True)
    external_ref = models.CharField(max_length=300, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=1)
    proposer_lease_id = models.BigIntegerField(null=True, blank=True)
    proposer_token = models.BigIntegerField(null=True, blank=True)
    proposed_at = models.DateTimeField(auto_now_add=True)
    committed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=["proposed", "committed", "failed"]),
                name="side_effect_status_valid",
            )
        ]

    def __str__(self) -> str:
        return self.idempotency_key


class ToolCallStatus(models.TextChoices):
    WAITING = "waiting"  # for its entity locks or a slot under its tool's cap
    AWAITING_APPROVAL = "awaiting_approval"  # its step parked until a human decides
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"


class ToolCall(models.Model):
    """One governed tool call made inside a step (``ctx.tool``): the run page's timeline of it,
    and, while ``running`` with a live slot lease, one of the calls its tool's caps count. What
    the call did is the ledger's (``effect``): a re-run of the step is answered from there."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="tool_calls", db_index=False)
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="tool_calls", db_index=False)
    key = models.CharField(max_length=200)  # its place in the step ("1", "2", ...) or the caller's key
    tool = models.CharField(max_length=100)
    status = models.CharField(max_length=20, choices=ToolCallStatus.choices, default=ToolCallStatus.WAITING)
    request = models.JSONField(default=dict)
    lock_keys = models.JSONField(default=list)
    effect = models.ForeignKey(SideEffect, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    approval_id = models.BigIntegerField(null=True, blank=True)
    # The slot under the tool's caps, a lease (so a dead worker's slot frees itself): held
    # while running, unless the step itself was admitted under the same tool's cap.
    lease_id = models.BigIntegerField(null=True, blank=True)
    lease_token = models.BigIntegerField(null=True, blank=True)
    lock_wait_ms = models.FloatField(null=True, blank=True)
    cap_wait_ms = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    attempt = models.PositiveIntegerField(default=0)  # the step's attempt that made it last
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["step", "key"], name="tool_call_key_unique_in_step")]
        indexes = [
            models.Index(fields=["run", "id"], name="tool_call_run"),
            models.Index(
                fields=["tool", "tenant"], name="tool_call_running", condition=models.Q(status="running")
            ),
        ]

    def __str__(self) -> str:
        return f"{self.step_id}:{self.key} {self.tool}"
