from __future__ import annotations

from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"

    def ready(self) -> None:
        # Plug humans into execution through the small interface runs defines.
        from approvals import services
        from runs import gates

        gates.register_gate(services.ApprovalGate())
        gates.register_conflict_hook(services.conflict_hook)
