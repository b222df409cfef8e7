from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """Runwarden's user. Custom from day one so fields can be added without a data migration."""


class Tenant(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug


class Role(models.TextChoices):
    OPERATOR = "operator", "Operator"
    REVIEWER = "reviewer", "Reviewer"
    ADMIN = "admin", "Admin"


class Membership(models.Model):
    """A user's role in one tenant. An admin may do everything an operator or reviewer may."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_one_role_per_tenant"),
            models.CheckConstraint(
                condition=models.Q(role__in=["operator", "reviewer", "admin"]), name="membership_role_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant}: {self.role}"


class TenantQuota(models.Model):
    """Per-tenant limits. ``max_concurrent_steps`` is the tenant scope's concurrency cap,
    ``max_queue_depth`` the number of unfinished runs before new triggers get 429, and
    ``weight`` the tenant's share in the dispatcher's round-robin. ``caps`` holds the tenant's
    own caps per workflow, lane and tool: ``{"workflow": {"demo.crm_update": 2}, "lane": {...},
    "tool": {...}}``, applied by the next admission round beside the platform's caps."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="quota")
    max_concurrent_steps = models.PositiveIntegerField(default=10)
    max_queue_depth = models.PositiveIntegerField(default=1000)
    weight = models.PositiveSmallIntegerField(default=1)
    caps = models.JSONField(default=dict, blank=True)
    # Which mid-step lock wait gives way in a deadlock (core.deadlocks), for the tenant's
    # workflows that declare none: kill_youngest_waiter or kill_oldest_waiter.
    deadlock_policy = models.CharField(max_length=24, default="kill_youngest_waiter")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(max_concurrent_steps__gte=1), name="quota_concurrency_min_1"
            ),
            models.CheckConstraint(condition=models.Q(weight__gte=1), name="quota_weight_min_1"),
        ]

    def __str__(self) -> str:
        return f"quota of {self.tenant}"


BUILTIN_ENVIRONMENTS = ("production", "staging")


class Environment(models.Model):
    """An environment a tenant's admins added beside the built-in production and staging."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="environments")
    name = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="environment_unique_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"


class Connection(models.Model):
    """An outside account (a CRM portal, a messaging or payments account) of one tenant in one
    environment. Credentials by reference: ``secret_ref`` (``env:NAME``) or ``secret_encrypted``
    (Fernet); neither is ever shown back. See ``core.connections``."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="connections")
    environment = models.CharField(max_length=64)
    provider = models.CharField(max_length=64)
    name = models.CharField(max_length=64)
    is_default = models.BooleanField(default=False)
    secret_ref = models.CharField(max_length=140, blank=True)
    secret_encrypted = models.TextField(blank=True)
    config = models.JSONField(default=dict, blank=True)
    created_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    archived_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "environment", "provider", "name"], name="connection_name_unique"
            ),
            models.UniqueConstraint(
                fields=["tenant", "environment", "provider"],
                condition=models.Q(is_default=True),
                name="connection_one_default",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant}/{self.environment}/{self.provider}/{self.name}"

    @property
    def secret_source(self) -> str:
        if self.secret_ref:
            return self.secret_ref
        return "encrypted" if self.secret_encrypted else "none"


class ApiToken(models.Model):
    """A per-user API token. Only the SHA-256 of the secret is stored; ``prefix`` (the first
    characters of the token) lets a user tell their tokens apart. Runs started with it run in
    its ``environment`` unless the request names another."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    environment = models.CharField(max_length=64, default="production")
    prefix = models.CharField(max_length=16)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Every token issued expires (RUNWARDEN_TOKEN_DEFAULT_DAYS unless asked otherwise); null
    # only on tokens issued before expiry existed.
    expires_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def state(self) -> str:
        from django.utils import timezone

        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class AppendOnlyError(Exception):
    """Raised on any attempt to change or delete an Event."""


class Event(models.Model):
    """The audit log and the outbox for live push: one row per state change, written in the
    transaction of the change. Rows are never updated or deleted; the database refuses it
    with a trigger (migration 0002) and the model refuses it before the query is sent."""

    # Indexed as the first column of event_tenant_id: a second index would only cost writes.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="events", db_index=False)
    subject = models.CharField(max_length=200)
    verb = models.CharField(max_length=64)
    actor = models.CharField(max_length=200)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "id"], name="event_tenant_id"),
            models.Index(fields=["subject", "id"], name="event_subject_id"),
            # The audit page's filters.
            models.Index(fields=["tenant", "verb", "id"], name="event_tenant_verb_id"),
            models.Index(fields=["tenant", "actor", "id"], name="event_tenant_actor_id"),
        ]

    def __str__(self) -> str:
        return f"{self.subject} {self.verb}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError("events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("events are append-only")


class Lease(models.Model):
    """Ownership of a resource key: ``step:<id>`` for a step, ``crm_contact:42`` for an entity.

    One row per (tenant, key), so at most one holder at any instant is a unique constraint.
    Each grant writes a new fencing token (from a database sequence, strictly increasing per
    key across take-overs). A lease past ``expires_at`` or with ``released_at`` set is free;
    once it is, the old token is refused by every fenced write.
    """

    # Indexed as the first column of lease_one_row_per_key.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="leases", db_index=False)
    key = models.CharField(max_length=200)
    token = models.BigIntegerField()
    holder = models.CharField(max_length=200)
    metadata = models.JSONField(default=dict)
    acquired_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "key"], name="lease_one_row_per_key")]
        indexes = [models.Index(fields=["expires_at"], name="lease_expires_at")]

    def __str__(self) -> str:
        return f"{self.key} #{self.token}"


class FencingCounter(models.Model):
    """The fencing-token sequence on SQLite (PostgreSQL uses a real sequence)."""

    value = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return str(self.value)


class OutboxStatus(models.TextChoices):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class OutboxMessage(models.Model):
    """A notification to send, written in the transaction of the change that causes it and
    drained by a Celery task. ``key`` dedupes enqueues; the receiver dedupes redeliveries."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    key = models.CharField(max_length=300, unique=True)
    kind = models.CharField(max_length=100)
    payload = models.JSONField(default=dict)
    # The W3C traceparent of the span that enqueued it: its delivery's span is that span's
    # child, in the same trace (core.tracing). Empty when tracing is off.
    traceparent = models.CharField(max_length=55, blank=True, default="")
    status = models.CharField(max_length=16, choices=OutboxStatus.choices, default=OutboxStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    available_at = models.DateTimeField()
    claimed_until = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["available_at", "id"],
                name="outbox_due",
                condition=models.Q(status__in=["pending", "sending"]),
            )
        ]

    def __str__(self) -> str:
        return self.key


class Notification(models.Model):
    """The in-app notification inbox: the receiving end of the outbox. Unique on the outbox key,
    so a redelivered message is recorded once."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="notifications")
    key = models.CharField(max_length=300, unique=True)
    kind = models.CharField(max_length=100)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.key


class Tally(models.Model):
    """How often something happened to a tenant in one minute (lock conflicts, duplicates
    suppressed, lock waits per bucket, ...): the overview's coordination figures, kept in the
    database so every process adds to the same count and a tenant sees only its own.
    Written by core.tallies with an upsert (never read-then-write)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    minute = models.DateTimeField()
    name = models.CharField(max_length=64)
    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "minute", "name"], name="tally_tenant_minute_name")
        ]
        indexes = [models.Index(fields=["minute"], name="tally_minute")]  # the hourly prune

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.minute:%H:%M} {self.name}={self.count}"


class LockWaiter(models.Model):
    """A holder waiting for entity locks in the middle of its work (``ctx.lock``, a governed
    call's locks): who waits for which keys, since when. With the live leases (who holds them)
    it is the wait-for graph ``core.deadlocks`` finds cycles in. The waiter refreshes
    ``seen_at`` while it waits; a row it stopped refreshing (its process died) is ignored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    holder = models.CharField(max_length=200)  # as its leases name it ("<run id>:<step key>")
    keys = models.JSONField(default=list)
    metadata = models.JSONField(default=dict, blank=True)  # run_id, step_id, step_key
    policy = models.CharField(max_length=24, default="kill_youngest_waiter")
    since = models.DateTimeField()
    seen_at = models.DateTimeField()
    # Set on the one waiter chosen to break a cycle: the cycle. Its wait raises LockDeadlock.
    victim_of = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "holder"], name="lock_waiter_unique_holder")]

    def __str__(self) -> str:
        return f"{self.holder} waits for {', '.join(self.keys)}"
