"""Runwarden settings: everything from environment variables, with safe defaults.

Two shapes, chosen by the environment:

* embedded (no ``DATABASE_URL`` / ``REDIS_URL``): SQLite under ``var/``, the in-memory
  channel layer and Celery's in-memory transport, with a Celery worker started inside the
  web process by ``manage.py serve``. Meant for ``make run`` on a bare machine.
* production (both set): PostgreSQL and Redis, with separate web, worker and beat processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from core.logs import logging_config

# Lets ModelAdmin[...] and QuerySet[...] be subscripted at run time, as django-stubs types them.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    """A string from the environment; ``NAME_FILE`` (a path) wins, for container secrets."""
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        return Path(file_path).read_text().strip()
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY is required when DEBUG is off (set DEBUG=1 for development).")
    SECRET_KEY = "django-insecure-runwarden-development-only"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")
# The embedded default runs everything in one process; see the module docstring.
EMBEDDED = not DATABASE_URL and not REDIS_URL

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "template_partials",
    "core",
    "runs",
    "approvals",
    # The demo (its workflows, the sandbox outside world, seeding, scenarios) and the benchmarks'
    # commands: apps of their own that the product's apps never import.
    "demo",
    "bench",
]

MIDDLEWARE = [
    # First: every answer (redirects and refusals of the others too) names the request's id.
    "core.middleware.request_id_middleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "core.security.security_headers_middleware",
    "core.security.refuse_nul_characters_middleware",
    "django_htmx.middleware.HtmxMiddleware",
    "core.middleware.ConcurrentUpdateMiddleware",
]

ROOT_URLCONF = "core.urls"
ASGI_APPLICATION = "core.asgi.application"
AUTH_USER_MODEL = "core.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "core:overview"
LOGOUT_REDIRECT_URL = "login"
# A request body larger than this is refused (the API answers 413) before it is read.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 1024 * 1024)

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "core.context_processors.tenancy",
            ],
        },
    }
]

if DATABASE_URL:
    # 0 unless set: the web process keeps its request threads' connections itself
    # (core/request_threads.py), the dispatcher and the workers theirs (WORKER_DB_CONN_MAX_AGE).
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 0))}
else:
    (BASE_DIR / "var").mkdir(exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH") or str(BASE_DIR / "var" / "runwarden.sqlite3"),
            # The embedded worker thread and the web threads share one file: wait for the
            # writer instead of failing with "database is locked".
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 1000, "expiry": 30},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: one REDIS_URL feeds the broker; the embedded default uses kombu's in-memory transport,
# which works because the worker runs in the same process (see core.embedded).
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 15 * 60)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 14 * 60)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Longer than any lease and any countdown: the lease, not the broker, decides who runs a step.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 60 * 60)}
CELERY_TIMEZONE = "UTC"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "var" / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}
# Serve from the finders too, so a checkout works without collectstatic.
WHITENOISE_USE_FINDERS = True

# Production hardening: on by default, switched off by DEBUG or explicitly (e.g. behind a
# proxy that terminates TLS and already redirects).
SECURE = not DEBUG
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", SECURE)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", SECURE)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", SECURE)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 60 * 60 * 24 * 365 if SECURE else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", SECURE)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", SECURE)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if env_bool("USE_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

# Accounts: failed logins per username (and 4x per address) within the window, then 429.
RUNWARDEN_LOGIN_FAILURE_LIMIT = env_int("RUNWARDEN_LOGIN_FAILURE_LIMIT", 5)
RUNWARDEN_LOGIN_FAILURE_WINDOW = env_int("RUNWARDEN_LOGIN_FAILURE_WINDOW", 15 * 60)
# Behind a proxy, the META key of the header carrying the client's address (its first one),
# e.g. HTTP_X_FORWARDED_FOR; empty: REMOTE_ADDR.
RUNWARDEN_CLIENT_IP_HEADER = env_str("RUNWARDEN_CLIENT_IP_HEADER", "")
# API tokens expire; a token may live at most this long (days).
RUNWARDEN_TOKEN_DEFAULT_DAYS = env_int("RUNWARDEN_TOKEN_DEFAULT_DAYS", 90)
RUNWARDEN_TOKEN_MAX_DAYS = env_int("RUNWARDEN_TOKEN_MAX_DAYS", 365)

# JSON lines in production, readable text in development (LOG_FORMAT=json|text overrides).
LOG_FORMAT = env_str("LOG_FORMAT", "text" if DEBUG else "json")
LOGGING = logging_config(fmt=LOG_FORMAT, level=env_str("LOG_LEVEL", "INFO"))

# Runwarden's own knobs.
DEMO_PASSWORD = env_str("DEMO_PASSWORD", "runwarden")
RUNWARDEN_DEFAULT_LEASE_SECONDS = env_int("RUNWARDEN_DEFAULT_LEASE_SECONDS", 30)
# The hot path's longer statements run as server-side prepared statements (PREPARE once per
# connection). Set to 0 behind a pooler that does not keep them (pgbouncer in transaction mode).
RUNWARDEN_PREPARED_STATEMENTS = env_bool("RUNWARDEN_PREPARED_STATEMENTS", True)

# Concurrency caps per scope (the tenant cap comes from TenantQuota.max_concurrent_steps).
# JSON in RUNWARDEN_CAPS overrides any part, e.g. '{"tool": {"crm": 2}}'.
RUNWARDEN_CAPS: dict[str, Any] = {
    "global": 300,
    "tenant_default": 10,
    "workflow": {},
    # The waiting lanes (model and tool calls) run many steps per worker process (Procfile).
    "lane": {"read": 100, "draft": 100, "external": 5, "high_risk": 2},
    "tool": {"crm": 4, "messaging": 4, "payments": 1},
}
for _scope, _value in json.loads(env_str("RUNWARDEN_CAPS", "{}")).items():
    if isinstance(_value, dict):
        RUNWARDEN_CAPS.setdefault(_scope, {}).update(_value)
    else:
        RUNWARDEN_CAPS[_scope] = _value

CELERY_BEAT_SCHEDULE = {
    "outbox-drain": {"task": "core.outbox_drain", "schedule": 5.0, "options": {"queue": "maintenance"}},
    "tallies-prune": {"task": "core.tallies_prune", "schedule": 3600.0, "options": {"queue": "maintenance"}},
    "approvals-expire": {
        "task": "approvals.expire",
        "schedule": 5.0,
        "options": {"queue": "maintenance", "expires": 10},
    },
}

RUNWARDEN_SANDBOX_LATENCY_MS = env_int("RUNWARDEN_SANDBOX_LATENCY_MS", 20)
# Tracing is configured by the standard OTEL_* variables (core/tracing.py); this only says
# where the run page links a run's trace id, e.g. http://localhost:16686/trace/{trace_id}.
RUNWARDEN_TRACE_URL_TEMPLATE = env_str("RUNWARDEN_TRACE_URL_TEMPLATE", "")
RUNWARDEN_SANDBOX_FAILURE_RATE = float(env_str("RUNWARDEN_SANDBOX_FAILURE_RATE", "0") or 0)
# The dispatcher process (python manage.py dispatcher; a thread in the embedded default).
RUNWARDEN_DISPATCH_BATCH = env_int("RUNWARDEN_DISPATCH_BATCH", 100)
RUNWARDEN_DISPATCH_SWEEP_SECONDS = float(env_str("RUNWARDEN_DISPATCH_SWEEP_SECONDS", "1.0"))
RUNWARDEN_REAP_EVERY_SECONDS = float(env_str("RUNWARDEN_REAP_EVERY_SECONDS", "1.0"))
# An admitted step's lease lasts this long until a worker picks it up (then its own lease
# length applies); a task still unstarted after RESEND_AFTER seconds is sent again.
RUNWARDEN_PICKUP_TIMEOUT_SECONDS = env_int("RUNWARDEN_PICKUP_TIMEOUT_SECONDS", 120)
RUNWARDEN_RESEND_AFTER_SECONDS = env_int("RUNWARDEN_RESEND_AFTER_SECONDS", 10)
# Admissions per announced worker slot. 1: a busy worker pulls its next step itself as it
# finishes one, so a step admitted ahead would only wait in the broker behind that chain.
RUNWARDEN_WORKER_PREFETCH = env_int("RUNWARDEN_WORKER_PREFETCH", 1)
# At most this many more steps a finishing worker admits at once for its pool's idle slots.
RUNWARDEN_WORKER_BATCH = env_int("RUNWARDEN_WORKER_BATCH", 4)
# How long one task may go on pulling the next step as it finishes one (then the task ends).
RUNWARDEN_WORKER_CHAIN_SECONDS = float(env_str("RUNWARDEN_WORKER_CHAIN_SECONDS", "10"))
# What the embedded default runs beside its in-process Celery worker (dotted callables).
EMBEDDED_BACKGROUND = ["runs.dispatcher.start_embedded"]
# Extra modules that declare workflows (besides the ``workflows.py`` of installed apps).
RUNWARDEN_WORKFLOW_MODULES = env_list("RUNWARDEN_WORKFLOW_MODULES", "")
# A worker on Celery's threads pool (many steps per process) does its database work on this
# many coordination threads, one connection each (core/coordination.py).
# SQLite (the embedded default) lets one writer in at a time: one thread, no queue for its lock.
RUNWARDEN_COORDINATION_THREADS = env_int("RUNWARDEN_COORDINATION_THREADS", 8 if DATABASE_URL else 1)
# The embedded default's waiting lanes (read, draft): steps at once on its threads-pool worker.
RUNWARDEN_EMBEDDED_WAITING_SLOTS = env_int("RUNWARDEN_EMBEDDED_WAITING_SLOTS", 50)
# The web process's request threads, each keeping its database connection (core/request_threads.py).
RUNWARDEN_WEB_THREADS = env_int("RUNWARDEN_WEB_THREADS", 8)
RUNWARDEN_WEB_CONN_MAX_AGE = env_int("RUNWARDEN_WEB_CONN_MAX_AGE", 300)
