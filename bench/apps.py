from __future__ import annotations

from django.apps import AppConfig


class BenchConfig(AppConfig):
    name = "bench"
    verbose_name = "Runwarden benchmarks"

    def ready(self) -> None:
        from bench import statement_counter

        statement_counter.install_if_enabled()  # off unless RUNWARDEN_COUNT_STATEMENTS (make bench)
