from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.runs.workflows_for_tests  # noqa: F401  (the test process knows the test workflows too)
from core.models import Tenant
from runs.sandbox import seed_sandbox
from tests.runs.cluster import Cluster


@pytest.fixture
def cluster(transactional_db: None, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sandbox_acme(acme: Tenant) -> Tenant:
    seed_sandbox(acme.pk)
    return acme
