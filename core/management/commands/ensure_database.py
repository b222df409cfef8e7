"""``manage.py ensure_database``: create the PostgreSQL database DATABASE_URL names when it does
not exist yet, so ``make run`` with a fresh DATABASE_URL starts instead of failing with a
traceback. Does nothing on SQLite (the file is created on first use) or when it exists."""

from __future__ import annotations

from typing import Any

import psycopg2  # type: ignore[import-untyped]
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from psycopg2 import errorcodes, sql


class Command(BaseCommand):
    help = "Create the PostgreSQL database of DATABASE_URL if it does not exist."

    def handle(self, *args: Any, **options: Any) -> None:
        db = settings.DATABASES["default"]
        if db["ENGINE"] != "django.db.backends.postgresql":
            return
        params = {
            "host": db.get("HOST") or None,
            "port": db.get("PORT") or None,
            "user": db.get("USER") or None,
            "password": db.get("PASSWORD") or None,
        }
        try:
            psycopg2.connect(dbname=db["NAME"], **params).close()
            return
        except psycopg2.OperationalError as exc:
            if f'database "{db["NAME"]}" does not exist' not in str(exc):
                raise CommandError(f"cannot reach PostgreSQL: {str(exc).strip()}") from None
        try:
            admin = psycopg2.connect(dbname="postgres", **params)
        except psycopg2.OperationalError as exc:
            raise CommandError(
                f"database {db['NAME']} does not exist and cannot be created: {str(exc).strip()}"
            ) from None
        admin.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with admin.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
        except psycopg2.Error as exc:
            if exc.pgcode != errorcodes.DUPLICATE_DATABASE:  # created meanwhile by someone else
                raise CommandError(f"cannot create database {db['NAME']}: {str(exc).strip()}") from None
        finally:
            admin.close()
        self.stdout.write(f"Created the PostgreSQL database {db['NAME']}.")
