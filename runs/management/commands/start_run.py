from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from core.models import Tenant
from runs.definitions import InvalidInput, UnknownWorkflow
from runs.services import QuotaExceeded, TriggerPayloadMismatch, run_start


class Command(BaseCommand):
    help = "Start a run of a workflow: start_run demo.enrich_lead --tenant acme --input '{\"lead_id\": 7}'"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("workflow")
        parser.add_argument("--tenant", required=True, help="tenant slug")
        parser.add_argument("--input", default="{}", help="the run input, a JSON object")
        parser.add_argument("--correlation-id", default="")
        parser.add_argument(
            "--trigger-event-id", default="", help="deduplicates deliveries of the same event"
        )
        parser.add_argument("--actor", default="cli")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"no tenant {options['tenant']!r}")
        try:
            data = json.loads(options["input"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--input is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CommandError("--input must be a JSON object")
        try:
            start = run_start(
                tenant=tenant,
                workflow=options["workflow"],
                input=data,
                actor=options["actor"],
                correlation_id=options["correlation_id"],
                trigger_event_id=options["trigger_event_id"],
            )
        except InvalidInput as exc:
            problems = "\n".join(f"  {path}: {message}" for path, message in exc.fields.items())
            raise CommandError(f"--input does not fit workflow {options['workflow']}:\n{problems}") from None
        except (UnknownWorkflow, TriggerPayloadMismatch, QuotaExceeded) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{'started' if start.created else 'already started'}: {start.run.id}")
