"""OpenTelemetry traces: one trace per run, configured only by the standard ``OTEL_*``
variables and costing nothing when they are unset.

A run's trace context is written on the run when it starts (``Run.traceparent``, a W3C
``traceparent``): its ``run`` span is a child of whatever span was current then (the ingress
request, itself a child of the caller's ``traceparent`` header). Every later span of the run —
its admissions, step attempts, effects, approvals, outbox deliveries — is a child of that
context, read from the row, whichever process records it and however much later. (Steps do
not travel one Celery message each — a worker runs a chain of them, a round admits a batch —
so the context rides on the run, not on the message.)

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``), and
``OTEL_SDK_DISABLED`` is not true. OTLP goes over HTTP (protobuf). Everything else — service
name, resource attributes, sampler, batching, headers — is the SDK's own reading of the
standard variables. When tracing is off, every function here returns at its first line.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer = trace.NoOpTracer()
_enabled = False

# A span that records nothing: what the context managers below yield when tracing is off.
NOT_RECORDING: Span = trace.INVALID_SPAN


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def enabled() -> bool:
    return _enabled


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Set up the SDK for this process when the standard variables ask for traces (at
    start-up, from ``CoreConfig.ready``): the exporters, the Django request spans, a flush
    when a worker process ends. Returns whether tracing is on."""
    global _tracer, _enabled
    environ = os.environ if environ is None else environ
    if _enabled or not wanted(environ):
        return _enabled
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporters: list[SpanExporter] = []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    for name in names:
        if name == "otlp":
            exporters.append(_otlp_exporter(environ))
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise ImproperlyConfigured(f"OTEL_TRACES_EXPORTER={name!r}: Runwarden exports to otlp or console")
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; these are defaults.
    resource = Resource.create(
        {
            "service.name": environ.get("OTEL_SERVICE_NAME") or "runwarden",
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        }  # fmt: skip
    )
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("runwarden")
    _enabled = True
    _instrument_django()
    _flush_when_worker_processes_end(provider)
    logger.info("tracing on: spans go to %s", ", ".join(names))
    return True


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ImproperlyConfigured(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: Runwarden sends OTLP over http/protobuf "
            "(a collector listens for it on port 4318)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: OTEL_EXPORTER_OTLP_*


def _instrument_django() -> None:
    # A span per request, a child of the caller's traceparent header; the URLs in
    # OTEL_PYTHON_DJANGO_EXCLUDED_URLS (e.g. "metrics,healthz,static") are left out.
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    instrumentor = DjangoInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def _flush_when_worker_processes_end(provider: Any) -> None:
    # A prefork child leaves with os._exit, past atexit: what it buffered goes out first.
    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(lambda **_: provider.force_flush(), weak=False)


def _context_of(traceparent: str) -> otel_context.Context | None:
    return _propagator.extract({"traceparent": traceparent}) if traceparent else None


def traceparent_of(span: Span) -> str:
    """The W3C ``traceparent`` naming ``span``; "" for a span that records nothing."""
    if not span.get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) of a ``traceparent``; "" when there is none."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def trace_url(trace_id: str) -> str:
    """Where an operator opens the trace: ``RUNWARDEN_TRACE_URL_TEMPLATE`` with ``{trace_id}``
    filled in (e.g. Jaeger's ``http://localhost:16686/trace/{trace_id}``); "" without one."""
    template = settings.RUNWARDEN_TRACE_URL_TEMPLATE
    return template.replace("{trace_id}", trace_id) if template and trace_id else ""


def outgoing_headers() -> dict[str, str]:
    """The ``traceparent`` (and ``tracestate``) of the current span, for an outgoing call to
    carry the trace on; empty when tracing is off."""
    if not _enabled:
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def current_trace_id() -> str:
    """The trace id of the span current here (a request's, a step's); "" without one."""
    if not _enabled:
        return ""
    current = trace.get_current_span().get_span_context()
    return format(current.trace_id, "032x") if current.is_valid else ""


def current_traceparent() -> str:
    return outgoing_headers().get("traceparent", "")


@contextmanager
def run_started(name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    """The span of a run's start, a child of the current span (the request that starts it);
    its ``traceparent_of`` is what the run keeps."""
    if not _enabled:
        yield NOT_RECORDING
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span


@contextmanager
def span_in_run(
    traceparent: str, name: str, attributes: dict[str, Any], kind: SpanKind = SpanKind.INTERNAL
) -> Iterator[Span]:
    """A span of the run whose context is ``traceparent`` (a child of its ``run`` span), current
    meanwhile: what starts inside (an effect's span) is its child. An exception leaving it
    marks it failed."""
    if not _enabled or not traceparent:
        yield NOT_RECORDING
        return
    with _tracer.start_as_current_span(
        name, context=_context_of(traceparent), kind=kind, attributes=attributes
    ) as span:
        yield span


@contextmanager
def child_span(name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    """A span under the current one (an effect inside its step's span); none when there is no
    current span to hang it from."""
    if not _enabled or not trace.get_current_span().get_span_context().is_valid:
        yield NOT_RECORDING
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span


def span_recorded(
    traceparent: str,
    name: str,
    *,
    start: datetime,
    end: datetime,
    attributes: dict[str, Any],
    failed: str = "",
    link_current: bool = False,
) -> None:
    """Record, after the fact, a span of the run whose context is ``traceparent`` that began at
    ``start`` and ended at ``end`` (a wait: for admission, for an approval). ``link_current``
    links it to the current span (the request whose decision ended the wait)."""
    if not _enabled or not traceparent:
        return
    links = []
    if link_current:
        current = trace.get_current_span().get_span_context()
        if current.is_valid:
            links.append(Link(current))
    span = _tracer.start_span(
        name,
        context=_context_of(traceparent),
        attributes=attributes,
        links=links,
        start_time=_nanoseconds(start),
    )
    if failed:
        span.set_status(Status(StatusCode.ERROR, failed))
    span.end(end_time=_nanoseconds(max(start, end)))


def mark_failed(span: Span, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, reason))


def _nanoseconds(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)
