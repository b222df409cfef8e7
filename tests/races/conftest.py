"""The race suite's world: the API served by real web processes (uvicorn, two of them, DEBUG
off) on the test database, and a tenant whose people act on one object at the same moment."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.conf import settings

from core import services
from core.models import Role, Tenant, User
from demo.sandbox import seed_sandbox
from tests.conftest import make_member, make_tenant
from tests.servers import base_env, console_server, database_url


@pytest.fixture(scope="module")
def served_api(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two real web processes on the test database, as in production (DEBUG off)."""
    env = base_env(
        DEBUG="0",
        SECRET_KEY="race-suite-only-not-a-secret-0123456789abcdef",
        SECURE_SSL_REDIRECT="0",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        RUNWARDEN_WORKFLOW_MODULES="tests.runs.workflows_for_tests",
    )
    log = tmp_path_factory.mktemp("races") / "serve.log"
    with console_server(env, log, workers=2) as url:
        yield url


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, parsed JSON body (None if it was not JSON), content type."""

    status: int
    body: Any
    content_type: str

    @property
    def code(self) -> str:
        return str((self.body or {}).get("error", {}).get("code", "")) if isinstance(self.body, dict) else ""


@dataclass
class Actor:
    """A person of the tenant with an API token, calling the served API over HTTP."""

    user: User
    token: str
    base_url: str

    def call(self, method: str, path: str, body: Any = None, if_match: int | None = None) -> Answer:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if if_match is not None:
            headers["If-Match"] = f'"{if_match}"'
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return _answer(response.status, response.read(), response.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as error:
            return _answer(error.code, error.read(), error.headers.get("Content-Type", ""))


def _answer(status: int, raw: bytes, content_type: str) -> Answer:
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    return Answer(status, body, content_type)


@dataclass
class World:
    tenant: Tenant
    actors: dict[str, Actor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Actor:
        return self.actors[name]


@pytest.fixture
def world(transactional_db: None, served_api: str) -> World:
    """Acme with its sandbox: two operators, an admin, two reviewers and the agent that starts
    runs (``api-bot``, an operator: it redrafts artifacts through the API)."""
    tenant = make_tenant("acme", "Acme Corp")
    seed_sandbox(tenant.pk)
    world = World(tenant)
    roles = {
        "op1": Role.OPERATOR,
        "op2": Role.OPERATOR,
        "admin": Role.ADMIN,
        "admin2": Role.ADMIN,
        "rev1": Role.REVIEWER,
        "rev2": Role.REVIEWER,
        "api-bot": Role.OPERATOR,
    }
    for name, role in roles.items():
        user = make_member(name, tenant, role)
        world.actors[name] = Actor(user, services.api_token_issue(user=user, name="races"), served_api)
    return world
