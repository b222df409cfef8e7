"""Logs: one JSON object per line in production (``LOG_FORMAT=json``, the default when DEBUG is
off), readable text under ``make run``. While a step runs, every line any code logs carries
the step's context — run_id, step_key, attempt, tenant, correlation_id, lease_token, and the
run's trace_id when it has a trace — from a
context variable the executor sets; the ledger adds the idempotency key and whether it was a
dedupe hit (answered from the record) or a miss (acted). While a web request is answered, every
line carries its ``request_id`` (the one ``core.middleware`` puts in the X-Request-ID header)."""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from core import tracing

_step_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "runwarden_step", default=None
)

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("runwarden_request_id", default=None)

# Attributes every LogRecord has; anything else on a record is an ``extra`` field to keep.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


@contextmanager
def step_context(**fields: Any) -> Iterator[None]:
    """Stamp ``fields`` on every log line of this thread (and the tasks it spawns) meanwhile."""
    token = _step_context.set({**(_step_context.get() or {}), **fields})
    try:
        yield
    finally:
        _step_context.reset(token)


def request_id_bind(request_id: str) -> contextvars.Token[str | None]:
    """Stamp ``request_id`` on every log line of this request until ``request_id_unbind``."""
    return _request_id.set(request_id)


def request_id_unbind(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def current_request_id() -> str | None:
    """The id of the request being answered in this context, or None outside a request."""
    return _request_id.get()


class StepContextFilter(logging.Filter):
    """Copies the running step's context and the request's id onto each record (as attributes,
    unless set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_step_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        if not hasattr(record, "request_id"):
            # Django logs a 4xx/5xx answer ("Unauthorized: /api/v1/me") after the middleware
            # has returned; that record carries the request, and the request its id.
            request_id = _request_id.get() or getattr(getattr(record, "request", None), "request_id", None)
            if request_id is not None:
                record.request_id = request_id
        if not hasattr(record, "trace_id") and (trace_id := tracing.current_trace_id()):
            record.trace_id = trace_id  # a request's lines too, not only a step's
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(
            {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        )
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# What the readable format appends (other libraries' extras, e.g. Celery's, stay in JSON only).
TEXT_FIELDS = (
    "run_id", "step_key", "attempt", "tenant", "correlation_id", "lease_token",
    "idempotency_key", "dedupe", "outcome", "request_id", "trace_id",
)  # fmt: skip


class TextFormatter(logging.Formatter):
    """The plain format, with the step's fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = {k: getattr(record, k) for k in TEXT_FIELDS if hasattr(record, k)}
        return text + ("  " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else "")


def logging_config(*, fmt: str, level: str) -> dict[str, Any]:
    formatter = (
        {"()": "core.logs.JsonFormatter"}
        if fmt == "json"
        else {"()": "core.logs.TextFormatter", "format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"step": {"()": "core.logs.StepContextFilter"}},
        "formatters": {"main": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "main", "filters": ["step"]}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {"django.db.backends": {"level": "WARNING"}},
    }
