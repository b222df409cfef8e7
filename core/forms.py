from __future__ import annotations

from typing import Any

from django import forms

from core.models import TenantQuota


class QuotaForm(forms.ModelForm[TenantQuota]):
    max_concurrent_steps = forms.IntegerField(min_value=1, max_value=100_000)
    max_queue_depth = forms.IntegerField(min_value=1, max_value=10_000_000)
    weight = forms.IntegerField(min_value=1, max_value=1000)

    class Meta:
        model = TenantQuota
        fields = ["max_concurrent_steps", "max_queue_depth", "weight"]

    def changes(self) -> dict[str, int]:
        return {field: self.cleaned_data[field] for field in self.Meta.fields}


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
    is_default = forms.BooleanField(required=False, label="Default for its provider in that environment")

    def __init__(self, *args: Any, environments: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["environment"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(name, name) for name in environments]
