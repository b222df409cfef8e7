from __future__ import annotations

from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Runwarden core"

    def ready(self) -> None:
        from core import after_response, live, services, tracing

        after_response.connect()
        services.event_listener_register(live.publish_event)
        tracing.configure()  # only when the OTEL_* variables ask for traces
