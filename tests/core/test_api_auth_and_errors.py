"""The API's edges: a request with an Authorization header is judged by its token alone (401,
never a CSRF 403, nothing changed); CSRF still guards browser sessions; an unexpected exception
is a JSON 500 whose request id is in the X-Request-ID header and in the log line; a deadlock is
a 409 ``concurrent_update``, on a real PostgreSQL deadlock."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.handlers.exception import convert_exception_to_response
from django.db import IntegrityError, OperationalError, connection, transaction
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.utils import timezone

from core import services
from core.db_errors import is_transient_conflict
from core.logs import JsonFormatter, StepContextFilter
from core.middleware import request_id_middleware
from core.models import ApiToken, Event, Membership, Tenant, TenantQuota, User
from runs.models import Run
from tests.concurrency import deadlock, failing_on, run_concurrently
from tests.conftest import bearer_client, make_tenant

JSON = "application/json"


def snapshot() -> tuple[Any, ...]:
    return (
        list(Run.objects.order_by("id").values_list("id", "status")),
        list(TenantQuota.objects.order_by("id").values_list("id", "max_concurrent_steps", "weight", "caps")),
        list(Membership.objects.order_by("id").values_list("id", "role")),
        list(ApiToken.objects.order_by("id").values_list("id", "revoked_at", "expires_at")),
        Event.objects.count(),
    )


# (method, path, body) for writes an admin's valid token would make; GET /me for a read.
WRITES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("post", "/api/v1/runs", {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}}),
    ("put", "/api/v1/tenants/acme/quota", {"weight": 5}),
    ("patch", "/api/v1/tenants/acme/members/operator", {"role": "reviewer"}),
    ("delete", "/api/v1/tenants/acme/members/operator", None),
    ("post", "/api/v1/tokens", {"name": "minted"}),
]


def send(client: Client, method: str, path: str, body: dict[str, Any] | None = None, **extra: Any) -> Any:
    if body is None:
        return getattr(client, method)(path, **extra)
    return getattr(client, method)(path, data=json.dumps(body), content_type=JSON, **extra)


def bad_authorization(kind: str, admin: User) -> str:
    if kind == "empty":
        return "Bearer "
    if kind == "garbage":
        return "Bearer rw_this-is-not-a-token"
    if kind == "basic":
        return "Basic YWRtaW46cHctYWRtaW4="  # admin:pw-admin, a right password in the wrong scheme
    raw = services.api_token_issue(user=admin, name=kind)
    token = ApiToken.objects.filter(prefix=raw[:10])
    if kind == "expired":
        token.update(expires_at=timezone.now() - timedelta(seconds=1))
    else:
        assert kind == "revoked"
        token.update(revoked_at=timezone.now())
    return f"Bearer {raw}"


def assert_unauthenticated(response: Any) -> None:
    assert response.status_code == 401, response.content
    assert response["Content-Type"].startswith(JSON)
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "unauthenticated"
    assert body["error"]["details"] == {} and body["error"]["message"]
    assert "Bearer" in response["WWW-Authenticate"]


TOKEN_KINDS = ["empty", "garbage", "expired", "revoked", "basic"]


@pytest.mark.django_db
@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_it_answers_401_to_a_bad_token_on_every_method_and_changes_nothing(
    kind: str, acme_admin: User, acme_operator: User
) -> None:
    # A real client: no test-client exemption from the CSRF check, as curl has none.
    client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=bad_authorization(kind, acme_admin))
    before = snapshot()
    for method, path, body in WRITES:
        assert_unauthenticated(send(client, method, path, body))
    assert_unauthenticated(client.get("/api/v1/me"))
    assert_unauthenticated(client.get("/api/v1/tenants/acme/quota"))
    assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_it_judges_a_request_with_a_token_by_the_token_even_with_a_good_session(
    kind: str, acme_admin: User, acme_operator: User
) -> None:
    browser = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=bad_authorization(kind, acme_admin))
    browser.force_login(acme_admin)
    browser.get("/tenants/acme/quotas/")  # the page hands out the CSRF cookie
    csrf = {"HTTP_X_CSRFTOKEN": browser.cookies["csrftoken"].value}
    before = snapshot()
    for method, path, body in WRITES:
        assert_unauthenticated(send(browser, method, path, body, **csrf))
    assert snapshot() == before


@pytest.mark.django_db
def test_a_valid_token_writes_with_no_csrf_token(acme_admin: User, acme_operator: User) -> None:
    # enforce_csrf_checks: neither Django's CsrfViewMiddleware nor ninja's check stands in the way.
    raw = services.api_token_issue(user=acme_admin, name="ci")
    api = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {raw}")
    started = send(api, "post", "/api/v1/runs", {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}})
    assert started.status_code == 201, started.content
    assert Run.objects.filter(pk=started.json()["id"]).exists()
    assert send(api, "put", "/api/v1/tenants/acme/quota", {"weight": 5}).status_code == 200
    assert TenantQuota.objects.get(tenant__slug="acme").weight == 5
    assert (
        send(api, "patch", "/api/v1/tenants/acme/members/operator", {"role": "reviewer"}).status_code == 200
    )
    assert send(api, "delete", "/api/v1/tenants/acme/members/operator").status_code == 204
    assert not Membership.objects.filter(user=acme_operator).exists()
    assert api.get("/api/v1/me").status_code == 200


@pytest.mark.django_db
def test_a_valid_token_cannot_mint_tokens(acme_admin: User) -> None:
    api = Client(
        enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {services.api_token_issue(user=acme_admin)}"
    )
    before = ApiToken.objects.count()
    assert_unauthenticated(send(api, "post", "/api/v1/tokens", {"name": "minted"}))
    assert ApiToken.objects.count() == before


@pytest.mark.django_db
def test_a_session_write_without_a_csrf_token_is_still_refused(acme_admin: User) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(acme_admin)
    before = snapshot()
    for method, path, body in WRITES:
        response = send(browser, method, path, body)
        assert response.status_code == 403, (path, response.content)
        assert response.json()["error"]["message"] == "CSRF check Failed"
    assert snapshot() == before
    # With the token the console hands out, the same session writes.
    browser.get("/tenants/acme/quotas/")
    csrf = browser.cookies["csrftoken"].value
    response = send(browser, "put", "/api/v1/tenants/acme/quota", {"weight": 5}, HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 200, response.content
    minted = send(browser, "post", "/api/v1/tokens", {"name": "laptop"}, HTTP_X_CSRFTOKEN=csrf)
    assert minted.status_code == 201, minted.content


# --- request ids and the 500 ------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The production log path (JSON formatter, the context filter) on django.request."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(StepContextFilter())
    log = logging.getLogger("django.request")
    log.addHandler(handler)
    try:
        yield out
    finally:
        log.removeHandler(handler)


@pytest.mark.django_db
def test_an_unexpected_exception_is_a_json_500_whose_request_id_is_in_the_log(
    acme_operator: User, json_log: io.StringIO
) -> None:
    api = bearer_client(acme_operator)
    api.raise_request_exception = False
    with connection.execute_wrapper(failing_on("core_membership", RuntimeError("the disk is on fire"))):
        response = api.get("/api/v1/me")
    assert response.status_code == 500
    assert response["Content-Type"].startswith(JSON)
    error = response.json()["error"]
    request_id = response["X-Request-ID"]
    assert error == {
        "code": "internal_error",
        "message": error["message"],
        "details": {"request_id": request_id},
    }
    assert "fire" not in response.content.decode(), "the exception stays in the log"
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    [logged] = [line for line in lines if line["level"] == "ERROR"]
    assert logged["request_id"] == request_id
    assert logged["message"] == "Internal Server Error: /api/v1/me"
    assert "RuntimeError: the disk is on fire" in logged["exc"]


@pytest.mark.django_db
def test_the_test_client_still_raises_an_api_handlers_exception(acme_operator: User) -> None:
    with (
        connection.execute_wrapper(failing_on("core_membership", RuntimeError("boom"))),
        pytest.raises(RuntimeError, match="boom"),
    ):
        bearer_client(acme_operator).get("/api/v1/me")


@pytest.mark.django_db
def test_every_answer_names_its_request_id_and_a_sane_incoming_one_is_kept(
    acme_operator: User, json_log: io.StringIO
) -> None:
    api = bearer_client(acme_operator)
    kept = api.get("/api/v1/me", HTTP_X_REQUEST_ID="lb-7f3a.2:9")
    assert kept.status_code == 200 and kept["X-Request-ID"] == "lb-7f3a.2:9"
    ids = set()
    for bad in ("", "has spaces", "x" * 65, "-leading-dash", 'quote"d', "é"):
        response = api.get("/api/v1/me", HTTP_X_REQUEST_ID=bad)
        assert response["X-Request-ID"] != bad and len(response["X-Request-ID"]) == 32
        ids.add(response["X-Request-ID"])
    assert len(ids) == 6, "each request gets its own"
    assert Client().get("/healthz")["X-Request-ID"]
    assert Client().get("/")["X-Request-ID"], "a redirect to the login page too"
    refused = Client().get("/api/v1/me", HTTP_X_REQUEST_ID="refused-1")
    assert refused.status_code == 401 and refused["X-Request-ID"] == "refused-1"
    # Django logs the 401 after the middleware has returned: the line carries the id all the same.
    [warning] = [json.loads(line) for line in json_log.getvalue().splitlines() if "Unauthorized" in line]
    assert warning["request_id"] == "refused-1"


def test_a_5xx_from_outside_the_apis_handlers_gets_the_error_shape_too(json_log: io.StringIO) -> None:
    def broken(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("in a middleware")

    inner: Any = convert_exception_to_response(broken)  # as Django wraps each middleware
    app = request_id_middleware(inner)
    response = app(RequestFactory().get("/api/v1/anything", HTTP_X_REQUEST_ID="outer-1"))
    assert response.status_code == 500 and response["X-Request-ID"] == "outer-1"
    error = json.loads(response.content)["error"]
    assert error["code"] == "internal_error" and error["details"] == {"request_id": "outer-1"}
    [logged] = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert logged["request_id"] == "outer-1" and "in a middleware" in logged["exc"]
    # A console page keeps Django's own 500 page.
    page = app(RequestFactory().get("/runs/"))
    assert page.status_code == 500 and not page["Content-Type"].startswith(JSON)


# --- deadlocks and serialization failures ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_real_deadlock_is_a_transient_conflict(acme: Tenant) -> None:
    globex = make_tenant("globex", "Globex")
    outcomes = deadlock(acme, globex)
    [error] = [o for o in outcomes if isinstance(o, BaseException)]
    assert outcomes.count("committed") == 1
    assert isinstance(error, OperationalError) and error.__cause__ is not None
    assert error.__cause__.pgcode == "40P01"  # type: ignore[attr-defined]
    assert is_transient_conflict(error)
    assert is_transient_conflict(error.__cause__), "the driver's own error as well"


@pytest.mark.django_db(transaction=True)
def test_a_real_serialization_failure_is_a_transient_conflict(acme: Tenant) -> None:
    read, written = threading.Event(), threading.Event()

    def race(i: int) -> str:
        if i == 0:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                Tenant.objects.get(pk=acme.pk)  # the snapshot is taken here
                read.set()
                assert written.wait(10)
                Tenant.objects.filter(pk=acme.pk).update(name="from the snapshot")
        else:
            assert read.wait(10)
            Tenant.objects.filter(pk=acme.pk).update(name="committed first")
            written.set()
        return "committed"

    repeatable, autocommit = run_concurrently(race, 2)
    assert autocommit == "committed"
    assert isinstance(repeatable, OperationalError)
    assert repeatable.__cause__.pgcode == "40001"  # type: ignore[union-attr]
    assert is_transient_conflict(repeatable)


@pytest.mark.django_db
def test_other_errors_are_not_transient_conflicts(acme: Tenant) -> None:
    with pytest.raises(IntegrityError) as duplicate, transaction.atomic():
        Tenant.objects.create(slug="acme", name="again")
    assert duplicate.value.__cause__.pgcode == "23505"  # type: ignore[union-attr]
    assert not is_transient_conflict(duplicate.value)
    assert not is_transient_conflict(ValueError("40P01"))
    assert not is_transient_conflict(RuntimeError("wrapped")), "a non-database error"


@pytest.mark.django_db(transaction=True)
def test_a_real_deadlock_in_an_api_write_is_a_409_and_changes_nothing(
    acme_admin: User, json_log: io.StringIO
) -> None:
    """The quota PUT locks the quota row. Here a second transaction already holds that row and
    then wants the tenant row, which the PUT's transaction takes (through Django's query
    wrapper) just before its own lock: a real cycle, which PostgreSQL breaks by aborting the
    PUT's transaction (the other one waits longer before it checks)."""
    acme = Tenant.objects.get(slug="acme")
    api = bearer_client(acme_admin)
    before = snapshot()
    other_holds_quota, put_holds_tenant = threading.Event(), threading.Event()
    other_pid: list[int] = []

    def other_transaction(i: int) -> str:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL deadlock_timeout = '20s'")
            cursor.execute("SELECT pg_backend_pid()")
            other_pid.append(cursor.fetchone()[0])
            cursor.execute("SELECT id FROM core_tenantquota WHERE tenant_id = %s FOR UPDATE", [acme.pk])
            other_holds_quota.set()
            assert put_holds_tenant.wait(10)
            cursor.execute("SELECT id FROM core_tenant WHERE id = %s FOR UPDATE", [acme.pk])
            transaction.set_rollback(True)
        return "done"

    def take_tenant_row_first(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any
    ) -> Any:
        if '"core_tenantquota"' in sql and "FOR UPDATE" in sql and not put_holds_tenant.is_set():
            execute("SELECT id FROM core_tenant WHERE id = %s FOR UPDATE", [acme.pk], False, ctx)
            put_holds_tenant.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the other transaction waits for it
                execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", other_pid, False, ctx)
                if ctx["cursor"].fetchone()[0]:
                    break
                time.sleep(0.02)
        return execute(sql, params, many, ctx)

    outcome: list[Any] = []
    holder = threading.Thread(target=lambda: outcome.extend(run_concurrently(other_transaction, 1)))
    holder.start()
    try:
        assert other_holds_quota.wait(10)
        with connection.execute_wrapper(take_tenant_row_first):
            response = send(api, "put", "/api/v1/tenants/acme/quota", {"weight": 5})
    finally:
        holder.join(30)
    assert outcome == ["done"]
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "concurrent_update" and "retry" in error["message"]
    assert snapshot() == before
    [logged] = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert logged["level"] == "WARNING" and logged["request_id"] == response["X-Request-ID"]
    assert "deadlock detected" in logged["exc"]
    # Sent again, the same request goes through.
    assert send(api, "put", "/api/v1/tenants/acme/quota", {"weight": 5}).status_code == 200
