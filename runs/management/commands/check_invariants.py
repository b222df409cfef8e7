from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from runs.invariants import check_invariants


class Command(BaseCommand):
    help = (
        "Check, read-only, that the live system holds its invariants (caps, leases, effects once, "
        "sessions, every run explained, events). Prints a line per finding; exit code 1 if any."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        findings = check_invariants()
        for finding in findings:
            self.stdout.write(str(finding))
        if findings:
            raise CommandError(f"{len(findings)} finding(s)", returncode=1)
        self.stdout.write("all invariants hold")
