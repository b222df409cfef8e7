"""Accounts and browser security: the login throttle, expiring and revocable API tokens, the
Content-Security-Policy (no inline script anywhere), and ``check --deploy`` in production."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.test import Client, override_settings
from django.utils import timezone

from core import services
from core.models import ApiToken, User
from core.redis_client import get_redis
from tests.conftest import client_for
from tests.servers import ROOT, base_env

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _forget_login_failures() -> Iterator[None]:
    """Failure counts live in Redis for 15 minutes; leave none behind for the next test."""
    yield
    client = get_redis()
    if client is not None:
        for key in client.scan_iter("runwarden:login-fail:*"):
            client.delete(key)
    from core import security

    security._local_counts.clear()


def _login(client: Client, username: str, password: str) -> int:
    return client.post("/accounts/login/", {"username": username, "password": password}).status_code


@pytest.mark.parametrize("redis_url", ["configured", ""], ids=["redis", "embedded"])
def test_repeated_failed_logins_get_429_with_retry_after_even_with_the_right_password(
    acme_operator: User, redis_url: str
) -> None:
    overrides = {} if redis_url else {"REDIS_URL": ""}
    with override_settings(**overrides, RUNWARDEN_LOGIN_FAILURE_LIMIT=3):
        guesser = Client(REMOTE_ADDR="10.0.0.7")
        assert [_login(guesser, "operator", f"guess{n}") for n in range(3)] == [200, 200, 200]
        refused = guesser.post("/accounts/login/", {"username": "operator", "password": "pw-operator"})
        assert refused.status_code == 429
        assert 0 < int(refused["Retry-After"]) <= 15 * 60
        assert b"Too many failed attempts" in refused.content
        assert "_auth_user_id" not in guesser.session, "no session was opened"
        # The username is throttled from everywhere (the guesser may rotate addresses)...
        assert _login(Client(REMOTE_ADDR="10.0.0.8"), "operator", "pw-operator") == 429
        # ...while other people log in as usual.
        other = make_user("someone-else")
        assert _login(Client(REMOTE_ADDR="10.0.0.8"), other.username, "pw-someone-else") == 302


def test_a_successful_login_clears_the_count(acme_operator: User) -> None:
    with override_settings(RUNWARDEN_LOGIN_FAILURE_LIMIT=3):
        client = Client(REMOTE_ADDR="10.0.0.9")
        for _ in range(2):
            assert _login(client, "operator", "wrong") == 200
        assert _login(client, "operator", "pw-operator") == 302
        for _ in range(2):
            assert _login(Client(REMOTE_ADDR="10.0.0.9"), "operator", "wrong") == 200
        assert _login(Client(REMOTE_ADDR="10.0.0.9"), "operator", "pw-operator") == 302


def test_a_lookalike_username_counts_against_the_same_account(acme_operator: User) -> None:
    with override_settings(RUNWARDEN_LOGIN_FAILURE_LIMIT=2):
        client = Client(REMOTE_ADDR="10.0.1.1")
        # Django's login normalizes (NFKC) the username: full-width letters are the same user.
        assert _login(client, "ｏｐｅｒａｔｏｒ", "guess") == 200
        assert _login(client, "OPERATOR", "guess") == 200
        assert _login(Client(REMOTE_ADDR="10.0.1.2"), "operator", "pw-operator") == 429


def test_django_admins_login_is_throttled_too(acme_operator: User) -> None:
    with override_settings(RUNWARDEN_LOGIN_FAILURE_LIMIT=2):
        client = Client(REMOTE_ADDR="10.0.2.1")
        for _ in range(2):
            assert client.post("/admin/login/", {"username": "root", "password": "guess"}).status_code == 200
        refused = client.post("/admin/login/", {"username": "root", "password": "guess"})
        assert refused.status_code == 429 and int(refused["Retry-After"]) > 0


def test_racing_guesses_never_get_more_tries_than_the_limit(acme_operator: User) -> None:
    from tests.concurrency import run_concurrently

    with override_settings(RUNWARDEN_LOGIN_FAILURE_LIMIT=3):
        statuses = run_concurrently(
            lambda i: _login(Client(REMOTE_ADDR=f"10.0.3.{i}"), "operator", "guess"), 12
        )
    assert statuses.count(200) == 3, statuses  # three were checked, the rest refused unchecked
    assert statuses.count(429) == 9


def test_logins_go_on_when_redis_is_down(acme_operator: User) -> None:
    from core import redis_client

    with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
        redis_client._client = None  # a client for the unreachable Redis
        try:
            assert _login(Client(REMOTE_ADDR="10.0.4.1"), "operator", "pw-operator") == 302
        finally:
            redis_client._client = None


def test_behind_a_proxy_the_forwarded_address_is_counted(acme_operator: User) -> None:
    with override_settings(
        RUNWARDEN_LOGIN_FAILURE_LIMIT=1, RUNWARDEN_CLIENT_IP_HEADER="HTTP_X_FORWARDED_FOR"
    ):
        for n in range(5):  # five guessers behind one proxy, each at its own username
            proxy = Client(REMOTE_ADDR="10.9.9.9", HTTP_X_FORWARDED_FOR=f"198.51.100.{n}, 10.9.9.9")
            assert _login(proxy, f"nobody{n}", "guess") == 200
        # The proxy's own address was not what counted: an honest user behind it logs in.
        honest = Client(REMOTE_ADDR="10.9.9.9", HTTP_X_FORWARDED_FOR="198.51.100.77")
        assert _login(honest, "operator", "pw-operator") == 302


def make_user(username: str) -> User:
    return User.objects.create_user(username=username, password="pw-" + username)


# --- API tokens -------------------------------------------------------------------------------


def test_tokens_expire_and_revoke_and_are_listed_without_secrets(acme_operator: User) -> None:
    raw = services.api_token_issue(user=acme_operator, name="ci", days=30)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    listed = api.get("/api/v1/tokens")
    assert listed.status_code == 200
    (token,) = listed.json()
    assert token["state"] == "active" and token["name"] == "ci"
    assert raw not in listed.content.decode() and "hash" not in listed.content.decode()
    expires = timezone.datetime.fromisoformat(token["expires_at"])
    assert timedelta(days=29) < expires - timezone.now() <= timedelta(days=30)

    ApiToken.objects.filter(pk=token["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert api.get("/api/v1/me").status_code == 401, "an expired token is refused"

    second = services.api_token_issue(user=acme_operator, name="two")
    api2 = Client(HTTP_AUTHORIZATION=f"Bearer {second}")
    second_id = ApiToken.objects.get(prefix=second[:10]).pk
    assert api2.delete(f"/api/v1/tokens/{second_id}").status_code == 204
    assert api2.get("/api/v1/me").status_code == 401, "a revoked token is refused from the next request"
    assert ApiToken.objects.get(pk=second_id).revoked_at is not None


def test_a_token_cannot_mint_tokens_or_touch_anothers(acme_operator: User, acme_admin: User) -> None:
    raw = services.api_token_issue(user=acme_operator)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    before = ApiToken.objects.count()
    assert api.post("/api/v1/tokens", data={}, content_type="application/json").status_code == 401
    admins = services.api_token_issue(user=acme_admin)
    admins_id = ApiToken.objects.get(prefix=admins[:10]).pk
    assert api.delete(f"/api/v1/tokens/{admins_id}").status_code == 404
    assert api.delete("/api/v1/tokens/99999999999999999999").status_code == 422
    assert ApiToken.objects.count() == before + 1
    assert ApiToken.objects.get(pk=admins_id).revoked_at is None


def test_a_browser_session_issues_a_token_shown_once(acme_operator: User) -> None:
    browser = client_for(acme_operator)
    created = browser.post(
        "/api/v1/tokens", data={"name": "laptop", "days": 7}, content_type="application/json"
    )
    assert created.status_code == 201, created.content
    raw = created.json()["token"]
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/v1/me").status_code == 200
    assert raw not in browser.get("/api/v1/tokens").content.decode()
    assert raw not in browser.get("/account/tokens/").content.decode()
    too_long = browser.post("/api/v1/tokens", data={"days": 4000}, content_type="application/json")
    assert too_long.status_code == 422
    page = browser.post(
        "/account/tokens/", {"action": "issue", "name": "page", "environment": "production", "days": 5}
    )
    assert page.status_code == 200
    shown = re.search(rb'id="new-token">(rw_[^<]+)<', page.content)
    assert shown is not None
    token_id = ApiToken.objects.get(prefix=shown.group(1)[:10].decode()).pk
    assert browser.post("/account/tokens/", {"action": "revoke", "token": token_id}).status_code == 302
    assert Client(HTTP_AUTHORIZATION=f"Bearer {shown.group(1).decode()}").get("/api/v1/me").status_code == 401


# --- headers and CSP --------------------------------------------------------------------------


INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>|\son[a-z]+=|\shx-on|javascript:", re.IGNORECASE)


def test_every_page_has_a_strict_csp_and_no_inline_script(acme_admin: User) -> None:
    browser = Client()
    assert INLINE_SCRIPT.search(browser.get("/accounts/login/").content) is None
    browser.force_login(acme_admin)
    pages = [
        "/",
        "/runs/",
        "/leases/",
        "/approvals/",
        "/conflicts/",
        "/tenants/acme/members/",
        "/tenants/acme/quotas/",
        "/tenants/acme/connections/",
        "/tenants/acme/audit/",
        "/account/tokens/",
    ]
    for path in pages:
        response = browser.get(path)
        assert response.status_code == 200, path
        csp = response["Content-Security-Policy"]
        script_src = next(part for part in csp.split("; ") if part.startswith("script-src"))
        assert script_src == "script-src 'self'", (path, csp)
        assert "frame-ancestors 'none'" in csp
        assert response["X-Frame-Options"] == "DENY"
        assert response["X-Content-Type-Options"] == "nosniff"
        found = INLINE_SCRIPT.search(response.content)
        assert found is None, (path, found.group(0) if found else None)


def test_check_deploy_is_clean_with_production_settings() -> None:
    env = base_env(
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(60),
        ALLOWED_HOSTS="runwarden.example.com",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
