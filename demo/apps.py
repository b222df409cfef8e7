from __future__ import annotations

from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "demo"
    verbose_name = "Runwarden demo"

    def ready(self) -> None:
        from demo import checks
        from runs import invariants

        # The sandbox records every call it receives: an effect that reached it twice shows.
        invariants.check_register("effects_once", checks.provider_saw_a_key_twice)
