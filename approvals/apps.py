from __future__ import annotations

from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"

    def ready(self) -> None:
        # Plug humans into execution through the small interface runs defines.
        from approvals import selectors, services
        from core import metrics
        from runs import gates

        metrics.gauge_register(
            "runwarden_conflicts_open", "Open conflict artifacts", ["kind"], selectors.open_conflict_samples
        )

        gates.register_gate(services.ApprovalGate())
        gates.register_conflict_hook(services.conflict_hook)
