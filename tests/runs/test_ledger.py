from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core import tallies
from core.leases import lease_acquire, lease_release
from core.models import Tally, Tenant
from runs.ledger import (
    EffectClaim,
    EffectOutcome,
    EffectRequestMismatch,
    EffectUnresolved,
    effect_claim,
    effect_confirm_committed,
    effect_execute,
    effect_settle,
)
from runs.models import EffectStatus, Run, SideEffect
from tests.concurrency import run_concurrently
from tests.dialects import ON_SQLITE, RACING_THREADS
from tests.servers import ROOT, base_env, database_url

pytestmark = pytest.mark.both_dialects


def make_run(tenant: Tenant) -> Run:
    return Run.objects.create(tenant=tenant, workflow="demo.test", actor="t", input={})


@pytest.mark.django_db(transaction=True)
def test_a_committed_effect_returns_its_recorded_result_without_running_again(acme: Tenant) -> None:
    run = make_run(acme)
    calls: list[int] = []
    first = effect_execute(
        run=run,
        step=None,
        kind="send",
        fn=lambda: calls.append(1) or {"id": "m-1"},
        request={"to": "x"},
        external_ref=lambda r: r["id"],
    )
    again = effect_execute(
        run=run, step=None, kind="send", fn=lambda: calls.append(1) or {"id": "m-2"}, request={"to": "x"}
    )
    assert calls == [1]
    assert (first.replayed, again.replayed) == (False, True)
    assert again.result == {"id": "m-1"}
    # The overview counts the duplicate suppressed, for this tenant.
    assert Tally.objects.get(tenant=acme, name=tallies.DUPLICATES_SUPPRESSED).count == 1
    effect = SideEffect.objects.get()
    assert (effect.status, effect.external_ref, effect.idempotency_key) == (
        "committed",
        "m-1",
        f"{run.id}:-:send",
    )


@pytest.mark.django_db(transaction=True)
def test_the_same_key_with_another_request_is_refused(acme: Tenant) -> None:
    run = make_run(acme)
    effect_execute(run=run, step=None, kind="send", fn=lambda: 1, request={"to": "x"})
    with pytest.raises(EffectRequestMismatch):
        effect_execute(run=run, step=None, kind="send", fn=lambda: 2, request={"to": "y"})


@pytest.mark.django_db(transaction=True)
def test_a_failed_effect_is_retried_once_under_the_same_key(acme: Tenant) -> None:
    run = make_run(acme)

    def boom() -> None:
        raise ConnectionError("provider down")

    with pytest.raises(ConnectionError):
        effect_execute(run=run, step=None, kind="send", fn=boom)
    assert SideEffect.objects.get().status == EffectStatus.FAILED
    outcome = effect_execute(run=run, step=None, kind="send", fn=lambda: "ok")
    effect = SideEffect.objects.get()
    assert (outcome.result, effect.status, effect.attempts) == ("ok", "committed", 2)


@pytest.mark.django_db(transaction=True)
def test_a_proposal_with_a_live_proposer_is_in_flight_and_with_a_dead_one_ambiguous(acme: Tenant) -> None:
    run = make_run(acme)
    lease = lease_acquire(tenant_id=acme.pk, key="step:1", holder="w1", ttl=30)
    assert lease is not None
    started, finish = threading.Event(), threading.Event()

    def slow_send() -> str:
        started.set()
        finish.wait(10)
        return "sent"

    worker = threading.Thread(
        target=lambda: effect_execute(run=run, step=None, kind="send", fn=slow_send, lease=lease), daemon=True
    )
    worker.start()
    assert started.wait(10)
    with pytest.raises(EffectUnresolved) as in_flight:
        effect_execute(run=run, step=None, kind="send", fn=lambda: "second")
    assert in_flight.value.in_flight
    lease_release(grant=lease)
    with pytest.raises(EffectUnresolved) as ambiguous:
        effect_execute(run=run, step=None, kind="send", fn=lambda: "second")
    assert not ambiguous.value.in_flight
    finish.set()
    worker.join(10)


@RACING_THREADS
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_the_same_effect_raced_from_many_threads_runs_its_callable_once(acme: Tenant) -> None:
    for trial in range(40):
        run = make_run(acme)
        calls: list[int] = []
        lock = threading.Lock()

        def attempt(
            i: int, run: Run = run, calls: list[int] = calls, lock: threading.Lock = lock
        ) -> EffectOutcome:
            def send() -> dict[str, int]:
                with lock:
                    calls.append(i)
                time.sleep(0.005)
                return {"sent_by": i}

            return effect_execute(run=run, step=None, kind="send", fn=send, request={"body": "hi"})

        results = run_concurrently(attempt, 12)
        assert len(calls) == 1, f"trial {trial}: callable ran {len(calls)} times"
        unexpected = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, EffectUnresolved)
        ]
        assert not unexpected, unexpected
        winners = [r for r in results if isinstance(r, EffectOutcome) and not r.replayed]
        assert len(winners) == 1
        assert SideEffect.objects.get(run=run).status == EffectStatus.COMMITTED


CRASH_SCRIPT = """
import os, django
django.setup()
from runs.models import Run
from runs.ledger import effect_execute
run = Run.objects.get(pk=os.environ["RUN_ID"])

def send_then_crash():
    with open(os.environ["CALLS_FILE"], "a") as calls:
        calls.write("sent\\n")
    os._exit(9)  # the worker dies after the provider accepted, before the outcome is recorded

effect_execute(run=run, step=None, kind="send", fn=send_then_crash, request={"body": "hi"})
"""


@pytest.mark.django_db(transaction=True)
def test_a_crash_between_proposed_and_committed_leaves_an_ambiguous_record_not_a_second_send(
    acme: Tenant, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    run = make_run(acme)
    calls_file = tmp_path / "calls.txt"
    db = settings.DATABASES["default"]
    env = base_env(DEBUG="1", RUN_ID=run.id, CALLS_FILE=str(calls_file))
    if ON_SQLITE:  # the crashing process opens the test database's file, as the embedded default
        env.pop("DATABASE_URL", None)
        env.pop("REDIS_URL", None)
        env["SQLITE_PATH"] = str(db["NAME"])
    else:
        env["DATABASE_URL"] = database_url()
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert crashed.returncode == 9, crashed.stderr
    assert calls_file.read_text() == "sent\n"

    calls_after: list[int] = []
    with pytest.raises(EffectUnresolved) as ambiguous:
        effect_execute(
            run=run, step=None, kind="send", fn=lambda: calls_after.append(1), request={"body": "hi"}
        )
    assert not ambiguous.value.in_flight
    assert calls_after == []
    assert calls_file.read_text() == "sent\n"
    assert SideEffect.objects.get(run=run).status == EffectStatus.PROPOSED


@pytest.mark.django_db(transaction=True)
def test_an_effect_is_proposed_in_one_statement_and_settled_in_one(acme: Tenant) -> None:
    """No read before the proposal's insert nor after the outcome's update (on PostgreSQL; SQLite
    reads first): what the step gets back is what was written."""
    run = make_run(acme)
    with CaptureQueriesContext(connection) as captured:
        outcome = effect_execute(
            run=run, step=None, kind="send", fn=lambda: {"id": "m-1"}, external_ref=lambda r: r["id"]
        )
    sent = [query["sql"].split()[0] for query in captured.captured_queries]
    sent = [verb for verb in sent if verb not in ("BEGIN", "COMMIT")]
    if not ON_SQLITE:
        assert sent == ["INSERT", "UPDATE"], captured.captured_queries
    stored = SideEffect.objects.get()
    assert (outcome.effect.pk, outcome.effect.status, outcome.effect.external_ref) == (
        stored.pk, stored.status, stored.external_ref,
    )  # fmt: skip
    assert (outcome.effect.result, outcome.effect.committed_at) == (stored.result, stored.committed_at)


@pytest.mark.django_db(transaction=True)
def test_a_claim_settled_by_someone_else_meanwhile_records_nothing_and_answers_what_was(
    acme: Tenant,
) -> None:
    """A proposer whose effect a reviewer settled while its call ran (a zombie) writes nothing
    over it: its outcome shows the row as the reviewer left it."""
    run = make_run(acme)
    claim = effect_claim(run=run, step=None, kind="send", request={"to": "x"})
    assert isinstance(claim, EffectClaim)
    assert effect_confirm_committed(effect_id=claim.effect.pk, external_ref="by-reviewer", verified_by="rev")
    outcome = effect_settle(claim, {"id": "late"})
    stored = SideEffect.objects.get()
    assert (stored.status, stored.external_ref) == (EffectStatus.COMMITTED, "by-reviewer")
    assert stored.result != {"id": "late"}
    assert (outcome.effect.external_ref, outcome.effect.result) == ("by-reviewer", stored.result)
