from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from core.models import Tenant
from runs.definitions import InvalidInput, UnknownWorkflow
from runs.services import QuotaExceeded, TriggerPayloadMismatch, run_start
from runs.sessions import SessionOverflow


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
        parser.add_argument("--environment", default="production", help="production, staging, ...")
        parser.add_argument(
            "--connection",
            action="append",
            default=[],
            metavar="PROVIDER=NAME",
            help="bind this connection instead of the environment's default (repeatable)",
        )
        parser.add_argument(
            "--session-key", default="", help="runs of one session run one at a time, in order"
        )
        parser.add_argument("--sequence", type=int, default=None, help="order within the session (from 1)")

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
        connections = dict(item.split("=", 1) for item in options["connection"] if "=" in item)
        if len(connections) != len(options["connection"]):
            raise CommandError("--connection takes PROVIDER=NAME")
        try:
            start = run_start(
                tenant=tenant,
                workflow=options["workflow"],
                input=data,
                actor=options["actor"],
                correlation_id=options["correlation_id"],
                trigger_event_id=options["trigger_event_id"],
                environment=options["environment"],
                connections=connections,
                session_key=options["session_key"],
                sequence=options["sequence"],
            )
        except InvalidInput as exc:
            problems = "\n".join(f"  {path}: {message}" for path, message in exc.fields.items())
            raise CommandError(f"the run does not fit workflow {options['workflow']}:\n{problems}") from None
        except (UnknownWorkflow, TriggerPayloadMismatch, QuotaExceeded, SessionOverflow) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{'started' if start.created else 'already started'}: {start.run.id}")
