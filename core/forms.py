from __future__ import annotations

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
