from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings

from core.models import Role, TenantQuota
from core.services import CAP_KINDS, CAP_MAX, QUOTA_LIMITS


class QuotaForm(forms.Form):
    """Every cap of a tenant: the three tenant-wide figures, then one optional cap per known
    workflow, lane and tool (blank: no cap of the tenant's own; the platform's still applies)."""

    max_concurrent_steps = forms.IntegerField(min_value=1, max_value=QUOTA_LIMITS["max_concurrent_steps"])
    max_queue_depth = forms.IntegerField(min_value=1, max_value=QUOTA_LIMITS["max_queue_depth"])
    weight = forms.IntegerField(min_value=1, max_value=QUOTA_LIMITS["weight"])
    deadlock_policy = forms.ChoiceField(
        required=False,  # left out: kept as it is
        choices=[
            ("kill_youngest_waiter", "the youngest waiter gives way"),
            ("kill_oldest_waiter", "the oldest"),
        ],
        label="Deadlock victim",
        help_text="when steps' lock waits form a cycle (a workflow may declare its own)",
    )

    def __init__(
        self, *args: Any, quota: TenantQuota, cap_names: dict[str, list[str]], **kwargs: Any
    ) -> None:
        initial = {field: getattr(quota, field) for field in [*QUOTA_LIMITS, "deadlock_policy"]}
        self.cap_fields: list[tuple[str, str, str]] = []  # (kind, name, field name)
        for kind in CAP_KINDS:
            for name in cap_names[kind]:
                field_name = f"cap__{kind}__{name}"
                self.cap_fields.append((kind, name, field_name))
                initial[field_name] = ((quota.caps or {}).get(kind) or {}).get(name)
        kwargs["initial"] = initial
        super().__init__(*args, **kwargs)
        for kind, name, field_name in self.cap_fields:
            platform_cap = settings.RUNWARDEN_CAPS.get(kind, {}).get(name)
            self.fields[field_name] = forms.IntegerField(
                required=False,
                min_value=1,
                max_value=CAP_MAX,
                label=name,
                help_text=f"platform cap {platform_cap}" if platform_cap else "no platform cap",
            )

    def cap_rows(self) -> list[tuple[str, list[forms.BoundField]]]:
        """The cap fields grouped by kind, for the template."""
        return [
            (kind, [self[field_name] for k, _, field_name in self.cap_fields if k == kind])
            for kind in CAP_KINDS
        ]

    def changes(self) -> dict[str, Any]:
        changes: dict[str, Any] = {field: self.cleaned_data[field] for field in QUOTA_LIMITS}
        if self.cleaned_data.get("deadlock_policy"):
            changes["deadlock_policy"] = self.cleaned_data["deadlock_policy"]
        caps: dict[str, dict[str, int | None]] = {kind: {} for kind in CAP_KINDS}
        for kind, name, field_name in self.cap_fields:
            caps[kind][name] = self.cleaned_data.get(field_name)
        changes["caps"] = caps
        return changes


class ConnectionForm(forms.Form):
    """Add a connection. The secret is write-only: the page never shows it back."""

    environment = forms.ChoiceField()
    provider = forms.CharField(max_length=64, help_text="crm, messaging, payments, …")
    name = forms.CharField(max_length=64)
    secret = forms.CharField(
        required=False,
        max_length=4096,
        widget=forms.PasswordInput(render_value=False),
        help_text="stored encrypted",
    )
    secret_ref = forms.CharField(required=False, max_length=140, help_text="or env:NAME, read by the workers")
    url = forms.URLField(
        required=False,
        max_length=500,
        assume_scheme="https",
        help_text="the provider's address (for a webhook: where notifications are POSTed)",
    )
    is_default = forms.BooleanField(required=False, label="Default for its provider in that environment")

    def __init__(self, *args: Any, environments: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["environment"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(name, name) for name in environments]


class MemberAddForm(forms.Form):
    """Give someone a role in the tenant; a username without an account needs a password."""

    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Role.choices, initial=Role.OPERATOR)
    email = forms.EmailField(required=False, help_text="for a new account")
    password = forms.CharField(
        required=False,
        max_length=128,
        widget=forms.PasswordInput(render_value=False),
        help_text="only for a new account; never shown again",
    )


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, required=False, help_text="to tell your tokens apart")
    environment = forms.CharField(max_length=64, initial="production", help_text="where runs it starts run")
    days = forms.IntegerField(
        min_value=1,
        max_value=settings.RUNWARDEN_TOKEN_MAX_DAYS,
        initial=settings.RUNWARDEN_TOKEN_DEFAULT_DAYS,
    )
