from __future__ import annotations

from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Runwarden core"

    def ready(self) -> None:
        from core import live, services, tracing

        services.event_listener_register(live.publish_event)
        tracing.configure()  # only when the OTEL_* variables ask for traces
