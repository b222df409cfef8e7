from __future__ import annotations

from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"

    def ready(self) -> None:
        # Plug humans into execution through the small interface runs defines.
        from approvals import notifications, selectors, services
        from core import metrics, outbox, overview
        from runs import explain, gates, invariants

        metrics.gauge_register(
            "runwarden_conflicts_open",
            "Open conflict artifacts",
            ["kind"],
            selectors.open_conflict_samples,
            known=selectors.conflict_kinds_known,
        )

        invariants.check_register("parked_for_a_human", selectors.parked_without_request)
        metrics.gauge_register(
            "runwarden_invariant_violations",
            "Findings of manage.py check_invariants, per check (0: it holds)",
            ["check"],
            invariants.violation_samples,
        )

        explain.human_waits_register(selectors.human_waits)
        overview.overview_section_register(
            "approvals", "approvals/_overview.html", selectors.approvals_overview, order=10
        )
        from core.context_processors import NAV_COUNTERS

        NAV_COUNTERS.append(selectors.pending_count_for_user)
        for kind in notifications.KINDS:
            outbox.DELIVERERS[kind] = notifications.deliver
        gates.register_gate(services.ApprovalGate())
        gates.register_conflict_hook(services.conflict_hook)
