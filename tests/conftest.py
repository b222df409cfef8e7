from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import Client

import tests.runs.workflows_for_tests  # noqa: F401  (the test process knows the test workflows too)
from core import services
from core.models import Membership, Role, Tenant, TenantQuota, User
from runs.sandbox import seed_sandbox
from tests.runs.cluster import Cluster


@pytest.fixture
def acme(db: None) -> Tenant:
    tenant = Tenant.objects.create(slug="acme", name="Acme Corp")
    TenantQuota.objects.create(tenant=tenant)
    return tenant


@pytest.fixture
def globex(db: None) -> Tenant:
    tenant = Tenant.objects.create(slug="globex", name="Globex Corporation")
    TenantQuota.objects.create(tenant=tenant)
    return tenant


def make_member(username: str, tenant: Tenant, role: str) -> User:
    user = User.objects.create_user(username=username, password="pw-" + username)
    Membership.objects.create(user=user, tenant=tenant, role=role)
    return user


@pytest.fixture
def acme_operator(acme: Tenant) -> User:
    return make_member("operator", acme, Role.OPERATOR)


@pytest.fixture
def acme_reviewer(acme: Tenant) -> User:
    return make_member("reviewer", acme, Role.REVIEWER)


@pytest.fixture
def acme_admin(acme: Tenant) -> User:
    return make_member("admin", acme, Role.ADMIN)


@pytest.fixture
def globex_operator(globex: Tenant) -> User:
    return make_member("globex-operator", globex, Role.OPERATOR)


@pytest.fixture
def globex_admin(globex: Tenant) -> User:
    return make_member("globex-admin", globex, Role.ADMIN)


def bearer_client(user: User) -> Client:
    """A test client that authenticates with a freshly issued API token."""
    token = services.api_token_issue(user=user, name="test")
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.fixture
def cluster(transactional_db: None, tmp_path: Path) -> Iterator[Cluster]:
    """Real Celery worker/beat processes on the test database; stopped after the test."""
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sandbox_acme(acme: Tenant) -> Tenant:
    seed_sandbox(acme.pk)
    return acme
