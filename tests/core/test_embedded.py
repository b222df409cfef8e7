from __future__ import annotations

import http.cookiejar
import json
import sqlite3
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.runs.cluster import wait_for
from tests.servers import base_env, console_server, manage

ENQUEUE = """
from django.db import transaction
from core.models import Tenant
from core.outbox import outbox_enqueue
with transaction.atomic():
    outbox_enqueue(tenant_id=Tenant.objects.get(slug="acme").pk, key="embedded:1", kind="hello", payload={})
"""
COUNT_DELIVERED = (
    "from core.models import Notification; print(Notification.objects.filter(key='embedded:1').count())"
)


START_LOCKED_RUN = (
    "from core.models import Tenant; from runs.services import run_start; "
    "run_start(tenant=Tenant.objects.get(slug='acme'), workflow='demo.crm_update', "
    "input={'contact_id': 1, 'changes': {'stage': 'won'}}, actor='t', trigger_event_id='embedded-lock')"
)
START_WAITING_RUNS = (
    "from core.models import Tenant; from runs.services import run_start; "
    "[run_start(tenant=Tenant.objects.get(slug='acme'), workflow='test.waits', input={'wait_seconds': 1.0}, "
    "actor='t', trigger_event_id=f'embedded-wait-{n}') for n in range(8)]"
)
WAITING_RUNS_SUCCEEDED = (
    "from runs.models import Run; "
    "print(Run.objects.filter(workflow='test.waits', status='succeeded').count())"
)
# The most steps that were running at one instant: each start, then each finish, in time order.
MOST_WAITING_AT_ONCE = """
from runs.models import Step
marks = []
for step in Step.objects.filter(run__workflow='test.waits'):
    marks += [(step.started_at, 1), (step.finished_at, -1)]
running = most = 0
for _, change in sorted(marks):
    running += change
    most = max(most, running)
print(most)
"""
LOCKED_RUN_STATUS = (
    "from runs.models import Run; print(Run.objects.get(trigger_event_id='embedded-lock').status)"
)


def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = base_env(
        DEBUG="1",
        SQLITE_PATH=str(tmp_path / "embedded.sqlite3"),
        RUNWARDEN_WORKFLOW_MODULES="tests.runs.workflows_for_tests",
    )
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    return env


def test_the_embedded_default_boots_and_serves_a_login(tmp_path: Path) -> None:
    env = embedded_env(tmp_path)
    manage("migrate", "--noinput", env=env)
    seeded = manage("seed_demo", env=env)
    assert "globex-operator" in seeded.stdout
    manage("seed_demo", env=env)  # idempotent

    log = tmp_path / "serve.log"
    with console_server(env, log) as url:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(url + "/readyz") as response:
            assert json.load(response)["checks"] == {"database": "ok", "redis": "ok"}
        with opener.open(url + "/accounts/login/") as response:
            assert b'name="username"' in response.read()
        csrf = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
        form = urllib.parse.urlencode(
            {"username": "operator", "password": "runwarden", "csrfmiddlewaretoken": csrf}
        ).encode()
        request = urllib.request.Request(url + "/accounts/login/", data=form, headers={"Referer": url + "/"})
        with opener.open(request) as response:
            page = response.read().decode()
        assert response.url == url + "/"
        assert "Acme Corp" in page

        def printed(code: str) -> list[str]:  # the last line another process prints
            return manage("shell", "-c", code, env=env).stdout.strip().splitlines()[-1:]

        # The in-process beat and Celery worker really execute tasks: a message written to the
        # outbox by another process is drained by them (the outbox drain runs every 5 s).
        manage("shell", "-c", ENQUEUE, env=env)
        wait_for(lambda: printed(COUNT_DELIVERED) == ["1"], 30, log.read_text, interval=0.5)

        def started_until(start: str, check: str, expected: str) -> None:
            manage("shell", "-c", start, env=env)
            wait_for(lambda: printed(check) == [expected], 60, lambda: log.read_text()[-4000:], interval=0.5)

        # And a run started by another process, whose step takes an entity lock, runs to the end.
        started_until(START_LOCKED_RUN, LOCKED_RUN_STATUS, "succeeded")
        # The waiting lanes run many steps at once, as the Procfile's do: eight runs that each
        # await a model for a second were running side by side, not one after another.
        started_until(START_WAITING_RUNS, WAITING_RUNS_SUCCEEDED, "8")
        assert int(printed(MOST_WAITING_AT_ONCE)[0]) > 1

    output = log.read_text()
    assert "Embedded mode" in output
    assert "Connected to memory://" in output


def test_events_stay_append_only_in_the_embedded_database_after_every_migration(tmp_path: Path) -> None:
    """SQLite rebuilds a table to alter a column, and a rebuild drops its triggers."""
    env = embedded_env(tmp_path)
    manage("migrate", "--noinput", env=env)
    with sqlite3.connect(tmp_path / "embedded.sqlite3") as db:
        triggers = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert {"core_event_no_update", "core_event_no_delete"} <= triggers
        db.execute(
            "INSERT INTO core_tenant (slug, name, created_at) VALUES ('t', 'T', '2026-01-01 00:00:00')"
        )
        db.execute(
            "INSERT INTO core_event (tenant_id, subject, verb, actor, payload, created_at)"
            " VALUES (1, 's', 'v', 'a', '{}', '2026-01-01 00:00:00')"
        )
        for statement in ("UPDATE core_event SET verb = 'changed'", "DELETE FROM core_event"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
