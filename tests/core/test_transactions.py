"""A transaction PostgreSQL aborts as a deadlock is run once more; a second abort is a clear
409, in the API (tests/core/test_api_auth_and_errors.py) and in the console (here)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test import Client

from core.models import Tenant, User
from core.transactions import transaction_retried_once
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.concurrency import deadlock, failing_on
from tests.conftest import make_tenant

pytestmark = pytest.mark.django_db(transaction=True)


def real_deadlock(acme: Tenant) -> OperationalError:
    """A deadlock error PostgreSQL really raised (two transactions, opposite lock orders)."""
    [error] = [o for o in deadlock(acme, make_tenant("globex", "Globex")) if isinstance(o, BaseException)]
    assert isinstance(error, OperationalError)
    return error


def test_an_aborted_transaction_runs_once_more_and_its_first_writes_are_gone(acme: Tenant) -> None:
    error = real_deadlock(acme)
    attempts: list[int] = []

    def rename() -> str:
        attempts.append(1)
        Tenant.objects.filter(pk=acme.pk).update(name=f"attempt {len(attempts)}")
        if len(attempts) == 1:
            raise error
        return Tenant.objects.get(pk=acme.pk).name

    assert transaction_retried_once(rename) == "attempt 2"
    assert len(attempts) == 2


def test_a_second_abort_or_another_error_is_raised_and_nothing_is_kept(acme: Tenant) -> None:
    error = real_deadlock(acme)

    def always(exc: BaseException) -> Any:
        def rename() -> None:
            Tenant.objects.filter(pk=acme.pk).update(name="never kept")
            raise exc

        return rename

    with pytest.raises(OperationalError):
        transaction_retried_once(always(error))
    with pytest.raises(ValueError):
        transaction_retried_once(always(ValueError("not a conflict: not retried")))
    assert Tenant.objects.get(pk=acme.pk).name == "Acme Corp"


def test_a_console_write_aborted_twice_is_a_409_with_a_sentence_and_changes_nothing(
    acme: Tenant, acme_operator: User
) -> None:
    run = run_start(tenant=acme, workflow="test.sleepy", input={"sleep_seconds": 0}, actor="api-bot").run
    error = real_deadlock(acme)
    browser = Client(raise_request_exception=False)
    browser.force_login(acme_operator)
    with connection.execute_wrapper(failing_on("runs_step", error)):
        htmx = browser.post(f"/runs/{run.pk}/cancel/", HTTP_HX_REQUEST="true")
        form = browser.post(f"/runs/{run.pk}/cancel/", HTTP_REFERER=f"http://testserver/runs/{run.pk}/")
    assert Run.objects.get(pk=run.pk).status == RunStatus.PENDING
    # htmx reloads the page, a plain form goes back to it; either way the page says what happened.
    assert (htmx.status_code, htmx["HX-Refresh"]) == (409, "true")
    assert (form.status_code, form["Location"]) == (303, f"http://testserver/runs/{run.pk}/")
    page = browser.get(f"/runs/{run.pk}/").content.decode()
    assert "nothing was saved" in page
    assert browser.post(f"/runs/{run.pk}/cancel/", HTTP_HX_REQUEST="true").status_code == 200
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED
