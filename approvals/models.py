from __future__ import annotations

from django.conf import settings
from django.db import models

from core.models import Tenant
from runs.models import Run, SideEffect, Step


class Artifact(models.Model):
    """The thing a human approves for one gated step (a draft message, a payment). Its content
    lives in immutable versions; ``latest_version`` is bumped by a compare-and-set on every edit."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="artifacts")
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="artifacts", db_index=False)
    # "" for the draft a gated step is approved on; a governed tool call's key in its step
    # (runs.ToolCall.key) for the call a human approves mid-step, with that call's policy.
    call_key = models.CharField(max_length=200, blank=True, default="")
    call_policy = models.JSONField(default=dict, blank=True)
    kind = models.CharField(max_length=50)
    latest_version = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["step", "call_key"], name="artifact_unique_per_step_call")
        ]

    def __str__(self) -> str:
        return f"artifact {self.pk} v{self.latest_version}"


class ArtifactVersion(models.Model):
    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    content = models.JSONField()
    author = models.CharField(max_length=200)
    source = models.CharField(max_length=10, choices=[("agent", "agent"), ("human", "human")])
    based_on = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["artifact", "number"], name="artifact_version_unique")]

    def __str__(self) -> str:
        return f"v{self.number}"


class ApprovalStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    CHANGES_REQUESTED = "changes_requested"
    INVALIDATED = "invalidated"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"  # its run was cancelled before anyone decided


class ApprovalRequest(models.Model):
    """One request for a decision on one artifact version. ``version`` is bumped on every
    change, and every decision is a conditional UPDATE on it: of two racing deciders exactly
    one wins. A decision computes the row it writes from the row at that version, so a write
    that leaves ``version`` as it was would be lost (``approvals.services.decisions``)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="approval_requests")
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="approval_requests")
    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="approval_requests")
    artifact_version = models.ForeignKey(ArtifactVersion, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=20, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING)
    version = models.PositiveIntegerField(default=1)
    required = models.PositiveSmallIntegerField(default=1)
    approvals = models.PositiveSmallIntegerField(default=0)
    eligible_roles = models.JSONField(default=list)
    escalated = models.BooleanField(default=False)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    comment = models.TextField(blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["step"], condition=models.Q(status="pending"), name="one_pending_approval_per_step"
            )
        ]
        indexes = [models.Index(fields=["tenant", "status", "id"], name="approval_tenant_status")]

    def __str__(self) -> str:
        return f"approval {self.pk} ({self.status})"


class ApprovalVote(models.Model):
    """One approver's yes on a request (a quorum needs ``required`` distinct voters)."""

    request = models.ForeignKey(ApprovalRequest, on_delete=models.CASCADE, related_name="votes")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["request", "user"], name="one_vote_per_user")]

    def __str__(self) -> str:
        return f"vote {self.user_id} on {self.request_id}"


class ConflictKind(models.TextChoices):
    STALE_APPROVAL = "stale_approval"
    LEASE_EXPIRED_WITH_PENDING_EFFECT = "lease_expired_with_pending_effect"
    STALE_TOKEN_WRITE = "stale_token_write"
    ENTITY_VERSION_MISMATCH = "entity_version_mismatch"
    DUPLICATE_TRIGGER_PAYLOAD = "duplicate_trigger_payload"
    CONCURRENT_EDIT = "concurrent_edit"
    CHANGED_INPUTS = "changed_inputs"
    COMPENSATION_FAILED = "compensation_failed"


class ConflictStatus(models.TextChoices):
    OPEN = "open"
    RESOLVED = "resolved"


class ConflictArtifact(models.Model):
    """A collision Runwarden refused to settle on its own, waiting for a reviewer."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    kind = models.CharField(max_length=40, choices=ConflictKind.choices)
    target_key = models.CharField(max_length=300)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, null=True, blank=True, related_name="conflicts")
    step = models.ForeignKey(Step, on_delete=models.CASCADE, null=True, blank=True, related_name="conflicts")
    effect = models.ForeignKey(SideEffect, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    current = models.JSONField(null=True, blank=True)  # what stands now (the winner, the newer version)
    proposed = models.JSONField(null=True, blank=True)  # what lost (the stale write, the older version)
    timing = models.JSONField(default=dict)
    suggestion = models.TextField()
    status = models.CharField(max_length=10, choices=ConflictStatus.choices, default=ConflictStatus.OPEN)
    version = models.PositiveIntegerField(default=1)
    resolution = models.CharField(max_length=40, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "status", "id"], name="conflict_tenant_status")]

    def __str__(self) -> str:
        return f"{self.kind} on {self.target_key}"
