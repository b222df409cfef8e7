from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core import outbox
from core.celery import app as celery_app
from core.models import Notification, OutboxMessage, OutboxStatus, Tenant
from tests.concurrency import run_concurrently
from tests.runs.cluster import wait_for
from tests.servers import ROOT, base_env, database_url


class Boom(Exception):
    pass


@pytest.mark.django_db(transaction=True)
def test_a_message_exists_only_if_its_transaction_commits(acme: Tenant) -> None:
    with pytest.raises(Boom), transaction.atomic():
        outbox.outbox_enqueue(tenant_id=acme.pk, key="n:1", kind="step_done", payload={})
        raise Boom
    assert not OutboxMessage.objects.exists()
    with transaction.atomic():
        assert outbox.outbox_enqueue(tenant_id=acme.pk, key="n:1", kind="step_done", payload={"x": 1})
    with transaction.atomic():
        assert not outbox.outbox_enqueue(tenant_id=acme.pk, key="n:1", kind="step_done", payload={"x": 1})
    assert outbox.outbox_drain() == 1
    assert outbox.outbox_drain() == 0
    assert Notification.objects.get(key="n:1").payload == {"x": 1}
    assert OutboxMessage.objects.get(key="n:1").status == OutboxStatus.SENT


@pytest.mark.django_db(transaction=True)
def test_a_failing_delivery_backs_off_and_is_retried(acme: Tenant) -> None:
    attempts: list[str] = []

    def flaky(message: OutboxMessage) -> None:
        attempts.append(message.key)
        if len(attempts) == 1:
            raise ConnectionError("smtp down")
        outbox.deliver_in_app(message)

    outbox.DELIVERERS["flaky"] = flaky
    try:
        with transaction.atomic():
            outbox.outbox_enqueue(tenant_id=acme.pk, key="f:1", kind="flaky", payload={})
        assert outbox.outbox_drain() == 0
        message = OutboxMessage.objects.get()
        assert (message.status, message.attempts) == (OutboxStatus.PENDING, 1)
        assert message.available_at > timezone.now()
        OutboxMessage.objects.update(available_at=timezone.now())
        assert outbox.outbox_drain() == 1
    finally:
        del outbox.DELIVERERS["flaky"]
    assert attempts == ["f:1", "f:1"]
    assert Notification.objects.filter(key="f:1").count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_concurrent_drainers_deliver_each_message_once(acme: Tenant) -> None:
    delivered: list[str] = []

    def counting(message: OutboxMessage) -> None:
        delivered.append(message.key)
        outbox.deliver_in_app(message)

    outbox.DELIVERERS["count"] = counting
    try:
        with transaction.atomic():
            for n in range(120):
                outbox.outbox_enqueue(tenant_id=acme.pk, key=f"c:{n}", kind="count", payload={})
        totals = run_concurrently(lambda i: sum(outbox.outbox_drain(limit=7) for _ in range(10)), 4)
    finally:
        del outbox.DELIVERERS["count"]
    assert sum(totals) == 120
    assert sorted(delivered) == sorted(f"c:{n}" for n in range(120)), "a message was delivered twice"
    assert Notification.objects.count() == 120


CRASHING_DRAINER = """
import os, django
django.setup()
from core import outbox
for message in outbox.outbox_claim():
    outbox.deliver_in_app(message)
os._exit(9)  # dies after delivering, before recording that it did
"""


@pytest.mark.django_db(transaction=True)
def test_a_drainer_crash_mid_way_never_records_a_notification_twice(acme: Tenant) -> None:
    with transaction.atomic():
        outbox.outbox_enqueue(tenant_id=acme.pk, key="crash:1", kind="step_done", payload={})
    env = base_env(DEBUG="1", DATABASE_URL=database_url())
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_DRAINER], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert crashed.returncode == 9, crashed.stderr
    assert OutboxMessage.objects.get().status == OutboxStatus.SENDING
    assert outbox.outbox_drain() == 0, "the claim is still live"
    later = timezone.now() + timedelta(seconds=outbox.CLAIM_SECONDS + 1)
    redelivered = outbox.outbox_claim(now=later)
    assert [m.key for m in redelivered] == ["crash:1"]
    assert outbox.outbox_deliver(redelivered[0])
    assert Notification.objects.filter(key="crash:1").count() == 1
    assert OutboxMessage.objects.get().status == OutboxStatus.SENT


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_a_real_celery_worker_drains_the_outbox_when_the_transaction_commits(acme: Tenant) -> None:
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    with celery_app.connection_for_write() as conn:
        conn.default_channel.queue_purge("maintenance")
    with start_worker(
        celery_app, pool="solo", perform_ping_check=False, queues=["maintenance"], shutdown_timeout=30
    ):
        with transaction.atomic():
            outbox.outbox_enqueue(tenant_id=acme.pk, key="live:1", kind="step_done", payload={"run": "r"})
        wait_for(
            lambda: Notification.objects.filter(key="live:1").exists(),
            30,
            "the worker did not drain the outbox",
        )
    assert OutboxMessage.objects.get(key="live:1").status == OutboxStatus.SENT
