from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.models import ApiToken, User
from core.services import api_token_find, api_token_issue

pytestmark = pytest.mark.django_db


def test_issue_token_prints_a_working_token_as_its_last_line(acme_operator: User) -> None:
    out = StringIO()
    call_command("issue_token", "operator", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    response = Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/v1/me")
    assert response.status_code == 200
    assert response.json() == {
        "username": "operator",
        "memberships": [{"tenant": "acme", "role": "operator"}],
    }


def test_tokens_are_stored_hashed(acme_operator: User) -> None:
    out = StringIO()
    call_command("issue_token", "operator", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    stored = ApiToken.objects.get(user=acme_operator)
    assert token not in (stored.token_hash, stored.prefix)
    assert len(stored.token_hash) == 64


def test_issue_token_refuses_an_unknown_user(db: None) -> None:
    with pytest.raises(CommandError, match="no active user"):
        call_command("issue_token", "nobody", stdout=StringIO())


@pytest.mark.parametrize(
    "header", [None, "Bearer rw_not-a-real-token", "Bearer ", "Basic b3BlcmF0b3I6cHc=", "Bearer x"]
)
def test_a_missing_or_bad_token_gets_401_with_a_json_error(acme_operator: User, header: str | None) -> None:
    client = Client(HTTP_AUTHORIZATION=header) if header is not None else Client()
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == "unauthenticated"
    assert "Bearer" in response["WWW-Authenticate"]


def test_a_revoked_token_gets_401(acme_operator: User) -> None:
    out = StringIO()
    call_command("issue_token", "operator", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    ApiToken.objects.filter(user=acme_operator).update(revoked_at=timezone.now())
    assert Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/v1/me").status_code == 401


def test_an_inactive_users_token_gets_401(acme_operator: User) -> None:
    out = StringIO()
    call_command("issue_token", "operator", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    User.objects.filter(pk=acme_operator.pk).update(is_active=False)
    assert Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/v1/me").status_code == 401


def test_a_token_notes_its_last_use_at_most_once_a_minute_without_a_write_in_between(
    acme_operator: User,
) -> None:
    raw = api_token_issue(user=acme_operator)
    token = ApiToken.objects.get(user=acme_operator)
    assert token.last_used_at is None
    assert api_token_find(raw) is not None
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    assert first is not None
    with CaptureQueriesContext(connection) as queries:
        assert api_token_find(raw) is not None
    assert [q["sql"].split()[0] for q in queries] == ["SELECT"]  # due in a minute: nothing written
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    assert api_token_find(raw) is not None
    touched = ApiToken.objects.get(pk=token.pk).last_used_at
    assert touched is not None and touched > first
