from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from core.models import Tenant
from runs.services import QuotaExceeded, run_start

MIX: list[tuple[int, str, Callable[[], dict[str, Any]]]] = [
    (
        15,
        "demo.chat_reply",  # started in one of three conversations (sessions)
        lambda: {
            "contact_id": random.randint(1, 5),
            "message": random.choice(["Can we move the call?", "Thanks!", "What is the price?"]),
        },
    ),
    (40, "demo.enrich_lead", lambda: {"lead_id": random.randint(1, 20)}),
    (
        30,
        "demo.crm_update",
        lambda: {
            "contact_id": random.randint(1, 5),
            "changes": {"stage": random.choice(["contacted", "qualified", "proposal"])},
        },
    ),
    (
        20,
        "demo.lead_followup",
        lambda: {"lead_id": random.randint(1, 20), "contact_id": random.randint(1, 20)},
    ),
    (
        10,
        "demo.invoice_payment",
        lambda: {"invoice_id": random.randint(1, 20), "amount": f"{random.randint(20, 300)}.00"},
    ),
    (
        10,
        "demo.support_agent",  # refunds above 100 wait for an approval mid-step
        lambda: {
            "contact_id": random.randint(1, 20),
            "ticket": random.choice(
                ["Where is my order?", "Please refund 40, the item broke", "I was charged twice, refund 180"]
            ),
            "payment_id": f"pay_{random.randint(100, 999)}",
        },
    ),
]


class Command(BaseCommand):
    help = "Start a realistic mix of demo runs so the console has something to show."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--tenant", default="acme")
        parser.add_argument("--runs", type=int, default=50)
        parser.add_argument(
            "--scenario",
            choices=["mix", "contention", "outside"],
            default="mix",
            help="mix: a realistic mix of runs; contention: lock waits, conflicts, an edited approval, "
            "a deadlock; outside: an agent outside Runwarden over HTTP (needs the console at --url)",
        )
        parser.add_argument(
            "--url", default="http://127.0.0.1:8000", help="the console, for --scenario outside"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"no tenant {options['tenant']!r}")
        if options["scenario"] == "contention":
            from demo.scenarios import contention  # the scenario needs people too

            def say(line: str) -> None:
                self.stdout.write(line)
                self.stdout.flush()  # each line as it happens: the scenario waits for workers

            contention(tenant, say)
            return
        if options["scenario"] == "outside":
            from demo.scenarios import outside_agent

            outside_agent(tenant, lambda line: self.stdout.write(line), base_url=options["url"])
            return
        weights = [w for w, _, _ in MIX]
        started = 0
        for _ in range(options["runs"]):
            _, workflow, make_input = random.choices(MIX, weights=weights)[0]
            session_key = f"conversation-{random.randint(1, 3)}" if workflow == "demo.chat_reply" else ""
            try:
                run_start(
                    tenant=tenant,
                    workflow=workflow,
                    input=make_input(),
                    actor="demo_traffic",
                    session_key=session_key,
                )
            except QuotaExceeded as exc:
                self.stdout.write(f"stopped: {exc}")
                break
            started += 1
        self.stdout.write(f"started {started} runs in {tenant.slug}")
