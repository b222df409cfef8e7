from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from runs.dispatcher import run_dispatcher


class Command(BaseCommand):
    help = "Run a dispatcher: admits ready steps, reaps lost admissions. Run two for a standby."

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write("Runwarden dispatcher: standing by until it holds the dispatcher lock.")
        self.stdout.flush()
        run_dispatcher(stop)
