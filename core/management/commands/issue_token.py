from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from core import services
from core.models import User


class Command(BaseCommand):
    help = "Issue an API token for a user; the token is the last line of the output."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="a label to tell tokens apart")
        parser.add_argument(
            "--environment",
            default="production",
            help="the environment runs started with this token run in (unless a request names one)",
        )
        parser.add_argument("--days", type=int, default=None, help="days until it expires (default 90)")

    def handle(
        self, *args: Any, username: str, name: str, environment: str, days: int | None, **options: Any
    ) -> None:
        user = User.objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"no active user named {username!r}")
        try:
            token = services.api_token_issue(user=user, name=name, environment=environment, days=days)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Token for {username} in {environment} (shown once, store it now):")
        self.stdout.write(token)
