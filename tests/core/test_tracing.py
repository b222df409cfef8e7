"""OpenTelemetry traces, exported over OTLP/HTTP to a receiver of the test's own (it decodes
the protobuf payloads as a collector would) while a run crosses the web process, the
dispatcher and two workers."""

from __future__ import annotations

import json
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from core import services as core_services
from core import tracing
from core.models import Role, Tenant
from runs.models import Run, RunStatus
from runs.services import run_start
from tests.conftest import make_member
from tests.dialects import REAL_WORKERS
from tests.runs.cluster import Cluster, wait_for
from tests.servers import base_env, console_server, database_url

# The processes it starts read what the test wrote: committed, not in a test transaction.
pytestmark = pytest.mark.django_db(transaction=True)


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, Any]
    links: list[str]  # the span ids it links to
    process: str  # service.instance.id: host:pid
    error: bool


class OtlpReceiver:
    """A collector's OTLP/HTTP trace endpoint: decodes each export, keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.take(self.path, self.headers.get("Content-Type", ""), body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, path: str, content_type: str, body: bytes) -> None:
        assert path == "/v1/traces", path
        assert content_type == "application/x-protobuf", content_type
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        received = []
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=[link.span_id.hex() for link in span.links],
                            process=str(resource.get("service.instance.id", "")),
                            error=span.status.code == 2,  # STATUS_CODE_ERROR
                        )
                    )
        with self.lock:
            self.requests += 1
            self.spans += received

    def named(self, name: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.name == name]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def _http(method: str, url: str, token: str, body: Any = None, **headers: str) -> tuple[int, Any, Any]:
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused), refused.headers


@REAL_WORKERS
@pytest.mark.timeout(240)
def test_a_run_is_one_trace_from_the_callers_request_through_every_process(
    sandbox_acme: Tenant, tmp_path: Path
) -> None:
    starter = core_services.api_token_issue(user=make_member("starter", sandbox_acme, Role.OPERATOR))
    approver = core_services.api_token_issue(user=make_member("approver", sandbox_acme, Role.OPERATOR))
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with otlp_receiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        cluster = Cluster(tmp_path, **otel)
        try:
            cluster.worker("w1")
            cluster.worker("w2")
            cluster.beat()  # with the dispatcher
            env = base_env(DEBUG="1", DATABASE_URL=database_url(), REDIS_URL=settings.REDIS_URL, **otel)
            with console_server(env, tmp_path / "web.log") as base:
                status, started, _ = _http(
                    "POST", f"{base}/api/v1/runs", starter,
                    {"workflow": "demo.lead_followup", "input": {"lead_id": 3, "contact_id": 1}},
                    traceparent=f"00-{caller_trace}-{caller_span}-01",
                )  # fmt: skip
                assert status == 201, started
                assert started["trace_id"] == caller_trace
                run_id = started["id"]
                # Two messages of one conversation: the second waits for the first's end.
                chat = [
                    _http(
                        "POST", f"{base}/api/v1/runs", starter,
                        {"workflow": "demo.chat_reply", "session_key": "conv-1",
                         "input": {"contact_id": 2, "message": f"message {n}"}},
                    )[1]["id"]
                    for n in range(2)
                ]  # fmt: skip
                wait_for(
                    lambda: Run.objects.get(pk=run_id).status == RunStatus.WAITING_APPROVAL, 60, cluster.logs
                )
                approvals = _http("GET", f"{base}/api/v1/approvals?run_id={run_id}", approver)[1]
                [pending] = [a for a in approvals if a["status"] == "pending"]
                status, _, _ = _http(
                    "POST", f"{base}/api/v1/approvals/{pending['id']}/approve", approver,
                    **{"If-Match": f'"{pending["version"]}"'},
                )  # fmt: skip
                assert status == 200
                wait_for(lambda: Run.objects.get(pk=run_id).status == RunStatus.SUCCEEDED, 60, cluster.logs)
                wait_for(
                    lambda: (
                        set(Run.objects.filter(pk__in=chat).values_list("status", flat=True)) == {"succeeded"}
                    ),
                    60,
                    cluster.logs,
                )
                wanted = [
                    "step send_message",
                    "effect messaging.send",
                    "approval send_message",
                    "step send_reply",
                ]
                wait_for(lambda: all(receiver.named(n) for n in wanted), 30, cluster.logs)
                worker_logs = (tmp_path / "w1.log").read_text() + (tmp_path / "w2.log").read_text()
        finally:
            cluster.stop()

    run_spans = [span for span in receiver.spans if span.attributes.get("runwarden.run_id") == run_id]
    assert {span.trace_id for span in run_spans} == {caller_trace}, "one trace: the caller's"
    # The ingress request is the caller's span's child; the run's start span is the request's.
    [start_request] = [s for s in receiver.spans if s.trace_id == caller_trace and s.parent_id == caller_span]
    assert start_request.attributes.get(
        "http.request.method", start_request.attributes.get("http.method")
    ) == ("POST")
    [run_span] = receiver.named("run demo.lead_followup")
    assert run_span.parent_id == start_request.span_id
    assert run_span.attributes["runwarden.created"] is True

    steps = {
        span.attributes["runwarden.step_key"]: span
        for span in sorted(run_spans, key=lambda s: s.attributes.get("runwarden.lease_token", 0))
        if span.name.startswith("step ")
    }
    assert list(steps) == ["enrich", "draft_message", "send_message"]
    for key, span in steps.items():
        assert span.parent_id == run_span.span_id, key
        assert span.attributes["runwarden.outcome"] == "succeeded"
        assert span.attributes["runwarden.lease_token"] > 0
        assert span.attributes["runwarden.worker"] == span.process  # host:pid of the worker
    # The gated step's first attempt asked for approval; the approved one ran it.
    assert [steps[key].attributes["runwarden.attempt"] for key in steps] == [1, 1, 2]
    assert {span.attributes["runwarden.lane"] for span in steps.values()} == {"read", "draft", "external"}
    # Each admission (the gated step's twice: asking, and after approval) has its span of
    # its own under the run's, with what it waited for.
    admissions = [s for s in run_spans if s.name.startswith("admission ")]
    assert sorted(s.attributes["runwarden.step_key"] for s in admissions) == [
        "draft_message", "enrich", "send_message", "send_message",
    ]  # fmt: skip
    assert all(s.parent_id == run_span.span_id for s in admissions)
    for admission in admissions:
        waited_for, waited = (
            admission.attributes["runwarden.waited_for"],
            admission.attributes["runwarden.waited_seconds"],
        )
        assert (waited_for == "nothing") == (waited < 0.1) and waited_for in {"nothing", "lock", "capacity"}

    [effect] = [span for span in receiver.named("effect messaging.send") if span.trace_id == caller_trace]
    assert effect.parent_id == steps["send_message"].span_id
    assert effect.attributes["runwarden.idempotency_key"] == f"{run_id}:send_message:messaging.send"
    assert effect.attributes["runwarden.dedupe"] == "miss"
    assert effect.attributes["runwarden.external_ref"]

    [approval] = receiver.named("approval send_message")
    assert approval.trace_id == caller_trace and approval.parent_id == run_span.span_id
    assert approval.attributes["runwarden.approval.outcome"] == "approve"
    assert approval.attributes["runwarden.approval.decided_by"] == "approver"
    # Linked to the approving request's span (another trace: the approver's click).
    [approve_request] = [s for s in receiver.spans if s.span_id in approval.links]
    assert approve_request.trace_id != caller_trace

    # The approval's notification was delivered through the outbox, in the run's trace.
    [outbox] = receiver.named("outbox approval_requested")
    assert outbox.trace_id == caller_trace and outbox.parent_id == run_span.span_id
    assert outbox.attributes["runwarden.outbox.key"] == f"approval_requested:{pending['id']}:1"

    # Each message of the conversation waited for its turn, in its own run's trace.
    turns = {span.attributes["runwarden.run_id"]: span for span in receiver.named("session turn")}
    assert set(turns) == set(chat)
    for chat_run in chat:
        [chat_start] = [
            s for s in receiver.named("run demo.chat_reply") if s.attributes["runwarden.run_id"] == chat_run
        ]
        turn = turns[chat_run]
        assert (turn.trace_id, turn.parent_id) == (chat_start.trace_id, chat_start.span_id)
        assert turn.attributes["runwarden.waited_for"] == "session"
        assert turn.attributes["runwarden.session_key"] == "conv-1"
    # The second message's turn came after the first's run had finished.
    assert (
        turns[chat[1]].attributes["runwarden.waited_seconds"]
        > turns[chat[0]].attributes["runwarden.waited_seconds"]
    )

    # Recorded by more than one process: the web process, and the workers that ran the steps.
    assert len({span.process for span in run_spans}) >= 2
    assert start_request.process != steps["send_message"].process
    assert f"trace_id={caller_trace}" in worker_logs


def test_the_standard_variables_decide_whether_there_are_traces() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    )
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})


def test_with_tracing_unset_nothing_is_recorded_or_kept(acme: Tenant) -> None:
    assert not tracing.enabled()
    # No SDK was installed: the API's default provider makes spans that record nothing.
    assert not trace.get_tracer("x").start_span("y").is_recording()
    run = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    assert Run.objects.get(pk=run.pk).traceparent == ""
    assert tracing.outgoing_headers() == {}


@REAL_WORKERS
@pytest.mark.timeout(120)
@pytest.mark.parametrize("off", [{"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true"}])
def test_a_collector_configured_but_tracing_turned_off_receives_nothing(
    sandbox_acme: Tenant, tmp_path: Path, off: dict[str, str]
) -> None:
    token = core_services.api_token_issue(user=make_member("starter", sandbox_acme, Role.OPERATOR))
    with otlp_receiver() as receiver:
        env = base_env(
            DEBUG="1", DATABASE_URL=database_url(), REDIS_URL=settings.REDIS_URL,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100", **off,
        )  # fmt: skip
        with console_server(env, tmp_path / "web.log") as base:
            status, started, _ = _http(
                "POST", f"{base}/api/v1/runs", token,
                {"workflow": "demo.crm_update", "input": {"contact_id": 2, "changes": {"stage": "won"}}},
                traceparent=f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
            )  # fmt: skip
            assert status == 201 and started["trace_id"] == ""
            assert _http("GET", f"{base}/api/v1/me", token)[0] == 200
        # The server has stopped: a batch it held would have been flushed as it exited.
    assert receiver.requests == 0


def test_the_run_page_and_the_api_name_the_runs_trace(client, acme: Tenant, acme_operator, settings) -> None:  # type: ignore[no-untyped-def]
    settings.RUNWARDEN_TRACE_URL_TEMPLATE = "http://jaeger.example:16686/trace/{trace_id}"
    trace_id = secrets.token_hex(16)
    run = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    Run.objects.filter(pk=run.pk).update(traceparent=f"00-{trace_id}-{secrets.token_hex(8)}-01")
    client.force_login(acme_operator)
    page = client.get(f"/runs/{run.id}/").content.decode()
    assert f'href="http://jaeger.example:16686/trace/{trace_id}"' in page
    assert client.get(f"/api/v1/runs/{run.id}").json()["trace_id"] == trace_id
    # Without a trace (tracing was off at its start) the page has no trace line.
    untraced = run_start(tenant=acme, workflow="bench.noop", input={}, actor="t").run
    assert "jaeger.example" not in client.get(f"/runs/{untraced.id}/").content.decode()
