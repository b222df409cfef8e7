from __future__ import annotations

import os
import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand
from django.db import connections

from core.collector import settle_after_startup
from runs.dispatcher import run_dispatcher


class Command(BaseCommand):
    help = "Run a dispatcher: admits ready steps, reaps lost admissions. Run two for a standby."

    def handle(self, *args: Any, **options: Any) -> None:
        # One long-lived process: keep its connection (close_old_connections in the loop still
        # replaces a broken one) instead of reconnecting every round.
        for connection in connections.all():
            connection.settings_dict["CONN_MAX_AGE"] = int(os.environ.get("WORKER_DB_CONN_MAX_AGE", "300"))
        settle_after_startup()
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write("Runwarden dispatcher: standing by until it holds the dispatcher lock.")
        self.stdout.flush()
        run_dispatcher(stop)
