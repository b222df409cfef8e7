"""Test settings: the real settings, plus what only tests need.

Tests of coordination run against the PostgreSQL and Redis named by DATABASE_URL/REDIS_URL
(``make test`` sets them to the machine's services); nothing here mocks them.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-use-0123456789")


# After REDIS_URL's DB (0 by default), clear of the benches' (2 and 3: make bench, make bench-peers).
WORKER_REDIS_DB_OFFSET = 4
BROWSER_REDIS_DB_OFFSET = 12


def _redis_url_of_this_process(url: str) -> str:
    """``make test`` runs pytest processes side by side (the unit suite's pytest-xdist workers, the
    browser suite): each takes a Redis DB of its own, next to REDIS_URL's, so that one's queues,
    wake-ups and channel groups never reach another's. pytest-django gives each its own database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        offset = WORKER_REDIS_DB_OFFSET + int(worker.removeprefix("gw"))
        if offset >= BROWSER_REDIS_DB_OFFSET:
            raise ValueError(f"at most {BROWSER_REDIS_DB_OFFSET - WORKER_REDIS_DB_OFFSET} xdist workers")
    elif os.environ.get("RUNWARDEN_TEST_SUITE") == "browser":
        offset = BROWSER_REDIS_DB_OFFSET
    else:
        return url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if parts.scheme == "unix" or "db" in query:  # unix:///path/to/socket?db=N; a query's db wins
        query["db"] = str((int(query.get("db", 0)) + offset) % 16)
        return f"{url.partition('?')[0]}?{urlencode(query)}"  # urlunsplit would drop an empty host
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db + offset) % 16}"))


if os.environ.get("REDIS_URL"):
    # Here, before the settings read it, and in the environment the processes a test starts inherit.
    os.environ["REDIS_URL"] = _redis_url_of_this_process(os.environ["REDIS_URL"])

from core.settings import *  # noqa: E402,F403
from core.settings import DATABASES  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# pytest-django would otherwise derive test_<name>; channels' live server doubles the prefix
# (django/channels#2176), so name it once, explicitly.
# Threads of database_sync_to_async and of race tests must not keep connections open.
DATABASES["default"]["CONN_MAX_AGE"] = 0
if "postgresql" in DATABASES["default"]["ENGINE"]:
    DATABASES["default"].setdefault("TEST", {})
    DATABASES["default"]["TEST"]["NAME"] = "test_" + str(DATABASES["default"]["NAME"]).removeprefix("test_")
    if os.environ.get("RUNWARDEN_TEST_SUITE") == "browser":
        DATABASES["default"]["TEST"]["NAME"] += "_browser"
SECURE_SSL_REDIRECT = False
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False
SECURE_HSTS_SECONDS = 0
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
