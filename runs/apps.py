from __future__ import annotations

from importlib import import_module

from django.apps import AppConfig
from django.conf import settings
from django.utils.module_loading import autodiscover_modules


class RunsConfig(AppConfig):
    name = "runs"

    def ready(self) -> None:
        # Workflows are declared in ``workflows.py`` of installed apps, and in any module
        # named by RUNWARDEN_WORKFLOW_MODULES (an integrator's own package).
        autodiscover_modules("workflows")
        for module in settings.RUNWARDEN_WORKFLOW_MODULES:
            import_module(module)

        from core import direct_admission, metrics, overview
        from core import services as core_services
        from runs import definitions, dispatch, queue_depth, selectors, services
        from runs.overview import runs_overview

        overview.overview_section_register("runs", "runs/_overview.html", runs_overview, order=20)

        core_services.event_enricher_register(services.event_with_run_contract)
        core_services.quota_cap_names_register(definitions.cap_names)
        core_services.quota_queue_depth_change_register(queue_depth.queue_places_hold_all)
        direct_admission.admitter_register(dispatch.admit_directly)

        metrics.gauge_register(
            "runwarden_queue_depth",
            "Ready steps waiting for admission",
            ["tenant", "lane"],
            selectors.queue_depth_samples,
            known=selectors.queue_depth_known,
        )
        metrics.gauge_register(
            "runwarden_inflight_steps",
            "Admitted steps (leased or running)",
            ["workflow"],
            selectors.inflight_samples,
            known=selectors.inflight_known,
        )
