"""Test settings: the real settings, plus what only tests need.

Tests of coordination run against the PostgreSQL and Redis named by DATABASE_URL/REDIS_URL
(``make test`` sets them to the machine's services); nothing here mocks them.
"""

from __future__ import annotations

import os

os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-use-0123456789")

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
SECURE_SSL_REDIRECT = False
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False
SECURE_HSTS_SECONDS = 0
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
