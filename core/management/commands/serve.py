from __future__ import annotations

import os
from typing import Any

import uvicorn
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Serve the console (ASGI, uvicorn). In the embedded default, also run a Celery worker in-process."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument(
            "--workers",
            type=int,
            default=int(os.environ.get("WEB_CONCURRENCY", "1")),
            help="web processes (not with the embedded default, whose worker lives in the one process)",
        )

    def handle(self, *args: Any, host: str, port: int, workers: int, **options: Any) -> None:
        if settings.EMBEDDED and workers != 1:
            raise CommandError(
                "the embedded default runs in one process: use --workers 1, or set DATABASE_URL/REDIS_URL"
            )
        if settings.EMBEDDED:
            from core.embedded import start_embedded_worker

            start_embedded_worker()
            self.stdout.write(
                "Embedded mode: SQLite under var/, in-memory channel layer, in-process Celery workers."
            )
        self.stdout.write(f"Runwarden console: http://{host}:{port}/")
        uvicorn.run(
            "core.asgi:application", host=host, port=port, workers=workers, log_level="info", lifespan="off"
        )
