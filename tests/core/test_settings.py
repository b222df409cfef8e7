from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from core.settings import env_bool, env_int

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG"}
    }
    clean.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_it_reads_booleans_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_FLAG", "yes")
    assert env_bool("X_FLAG", False) is True
    monkeypatch.setenv("X_FLAG", "0")
    assert env_bool("X_FLAG", True) is False
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_FLAG"):
        env_bool("X_FLAG", False)


def test_it_refuses_a_non_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_NUM", "ten")
    with pytest.raises(ImproperlyConfigured, match="X_NUM"):
        env_int("X_NUM", 1)


def test_it_requires_a_secret_key_when_debug_is_off() -> None:
    result = run_python("import core.settings")
    assert result.returncode != 0
    assert "SECRET_KEY is required" in result.stderr


def test_it_uses_the_embedded_default_without_database_and_redis_urls() -> None:
    result = run_python(
        "import core.settings as s; print(s.EMBEDDED, s.DATABASES['default']['ENGINE'], "
        "s.CHANNEL_LAYERS['default']['BACKEND'], s.CELERY_BROKER_URL)",
        DEBUG="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "True",
        "django.db.backends.sqlite3",
        "channels.layers.InMemoryChannelLayer",
        "memory://",
    ]


def test_it_uses_postgres_and_redis_when_configured() -> None:
    result = run_python(
        "import core.settings as s; print(s.EMBEDDED, s.DATABASES['default']['ENGINE'], "
        "s.CHANNEL_LAYERS['default']['BACKEND'], s.CELERY_BROKER_URL)",
        DEBUG="1",
        DATABASE_URL="postgres://u@db.example:5432/rw",
        REDIS_URL="redis://cache.example:6379/2",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "False",
        "django.db.backends.postgresql",
        "channels_redis.core.RedisChannelLayer",
        "redis://cache.example:6379/2",
    ]


def test_check_deploy_is_clean_in_production_shape() -> None:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DJANGO_SETTINGS_MODULE", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={
            **clean,
            "DEBUG": "0",
            "SECRET_KEY": "a-real-production-secret-" + "x9Q2kLm7Vb3Nc8Zr4Tw6Yp1" * 2,
            "DJANGO_SETTINGS_MODULE": "core.settings",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("worker", "suite", "url", "expected"),
    [
        ("", "", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("gw0", "", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/4"),
        ("gw1", "", "redis://127.0.0.1:6379", "redis://127.0.0.1:6379/5"),
        (
            "gw1",
            "",
            "rediss://:pw@cache:6380/15?ssl_cert_reqs=none",
            "rediss://:pw@cache:6380/4?ssl_cert_reqs=none",
        ),
        ("", "browser", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/12"),
        ("gw0", "", "unix:///run/redis.sock?db=3", "unix:///run/redis.sock?db=7"),
        ("gw0", "", "redis://127.0.0.1:6379?db=1", "redis://127.0.0.1:6379?db=5"),
    ],
)
def test_each_pytest_process_of_make_test_takes_a_redis_db_of_its_own(
    monkeypatch: pytest.MonkeyPatch, worker: str, suite: str, url: str, expected: str
) -> None:
    from core.settings_test import _redis_url_of_this_process

    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("RUNWARDEN_TEST_SUITE", suite)
    assert _redis_url_of_this_process(url) == expected


def test_more_xdist_workers_than_redis_dbs_between_them_and_the_browser_suite_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.settings_test import _redis_url_of_this_process

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw8")
    with pytest.raises(ValueError, match="at most 8 xdist workers"):
        _redis_url_of_this_process("redis://127.0.0.1:6379/0")
