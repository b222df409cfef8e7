"""The demo's outside world: in-repo stand-ins for a CRM, a messaging service and a payment
provider. Every call is recorded in SandboxCall, so tests can count what really happened.
They deliberately do NOT deduplicate: exactly-once must come from Runwarden's ledger."""

from __future__ import annotations

from django.db import models

from core.models import Tenant


class SandboxContact(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    number = models.PositiveIntegerField()
    name = models.CharField(max_length=200)
    email = models.EmailField()
    stage = models.CharField(max_length=50, default="new")
    version = models.PositiveIntegerField(default=1)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "number"], name="sandbox_contact_unique")]

    def __str__(self) -> str:
        return f"contact {self.number}"


class SandboxLead(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    number = models.PositiveIntegerField()
    name = models.CharField(max_length=200)
    company = models.CharField(max_length=200)
    score = models.IntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "number"], name="sandbox_lead_unique")]

    def __str__(self) -> str:
        return f"lead {self.number}"


class SandboxInvoice(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    number = models.PositiveIntegerField()
    customer = models.CharField(max_length=200)
    amount_due = models.DecimalField(max_digits=12, decimal_places=2)
    amount_paid = models.DecimalField(max_digits=12, decimal_places=2, default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "number"], name="sandbox_invoice_unique")]

    def __str__(self) -> str:
        return f"invoice {self.number}"


class SandboxCall(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    connector = models.CharField(max_length=30)  # crm | messaging | payments
    operation = models.CharField(max_length=50)
    target = models.CharField(max_length=100)
    request = models.JSONField(default=dict)
    response = models.JSONField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=300, blank=True)
    ok = models.BooleanField(default=True)
    # The account the call went to, and who called (from ``ctx.connection``).
    connection = models.ForeignKey(
        "core.Connection", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    environment = models.CharField(max_length=64, blank=True)
    run_id = models.CharField(max_length=40, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["connector", "operation", "target"], name="sandbox_call_lookup")]

    def __str__(self) -> str:
        return f"{self.connector}.{self.operation}({self.target})"
