from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from pydantic import BaseModel, ConfigDict

from core.models import Event, Tenant, User
from runs.definitions import InvalidInput, Workflow, get_workflow, unregister, workflow
from runs.models import Run, Step, TriggerEvent
from runs.services import run_start
from tests.conftest import client_for, post_run

pytestmark = pytest.mark.django_db

VALID: dict[str, dict[str, Any]] = {
    "demo.enrich_lead": {"lead_id": 7},
    "demo.crm_update": {"contact_id": 1, "changes": {"stage": "won"}},
    "demo.lead_followup": {"lead_id": 7, "contact_id": 1},
    "demo.invoice_payment": {"invoice_id": 3, "amount": "120.00"},
    "bench.noop": {},
}

REQUIRED = "Field required"
EXTRA = "Extra inputs are not permitted"
NUL = "NUL characters (\\u0000) are not allowed"
NUL_KEY = "NUL characters (\\u0000) are not allowed in keys"

# (workflow, input, {dotted path: message, or None to check the path only})
BAD_INPUTS: list[tuple[str, dict[str, Any], dict[str, str | None]]] = [
    ("demo.enrich_lead", {}, {"lead_id": REQUIRED}),
    ("demo.enrich_lead", {"lead_id": "seven"}, {"lead_id": None}),
    ("demo.enrich_lead", {"lead_id": True}, {"lead_id": "Input should be a number, not a boolean"}),
    ("demo.enrich_lead", {"lead_id": 0}, {"lead_id": "Input should be greater than or equal to 1"}),
    ("demo.enrich_lead", {"lead_id": 7, "priority": "high"}, {"priority": EXTRA}),
    ("demo.enrich_lead", {"lead_id": 7, "no\x00te": "x"}, {"no\\u0000te": NUL_KEY}),
    ("demo.enrich_lead", {"lead_id": "7\x00"}, {"lead_id": NUL}),
    ("demo.crm_update", {"contact_id": 1}, {"changes": REQUIRED}),
    ("demo.crm_update", {"contact_id": 1, "changes": {}}, {"changes.stage": REQUIRED}),
    ("demo.crm_update", {"contact_id": 1, "changes": {"stage": 5}}, {"changes.stage": None}),
    ("demo.crm_update", {"contact_id": 1, "changes": {"stage": "x" * 51}}, {"changes.stage": None}),
    ("demo.crm_update", {"contact_id": 1, "changes": "won"}, {"changes": None}),
    (
        "demo.crm_update",
        {"contact_id": 1, "changes": {"stage": "won", "phone": "1"}},
        {"changes.phone": EXTRA},
    ),
    (
        "demo.crm_update",
        {"contact_id": 1, "changes": {"stage": "won", "email": "nope"}},
        {"changes.email": None},
    ),
    ("demo.crm_update", {"contact_id": 1, "changes": {"stage": "w\x00n"}}, {"changes.stage": NUL}),
    (
        "demo.crm_update",
        {"contact_id": 1, "changes": {"stage": "won", "\x00": "x"}},
        {"changes.\\u0000": NUL_KEY},
    ),
    ("demo.lead_followup", {"lead_id": 7}, {"contact_id": REQUIRED}),
    ("demo.lead_followup", {"lead_id": [7], "contact_id": 1}, {"lead_id": None}),
    ("demo.lead_followup", {"lead_id": 7, "contact_id": 1, "channel": "sms"}, {"channel": EXTRA}),
    ("demo.lead_followup", {"lead_id": 7, "contact_id": 1, "k\x00": 1}, {"k\\u0000": NUL_KEY}),
    ("demo.lead_followup", {"lead_id": 7, "contact_id": "\x001"}, {"contact_id": NUL}),
    ("demo.invoice_payment", {"invoice_id": 3}, {"amount": REQUIRED}),
    ("demo.invoice_payment", {"invoice_id": 3, "amount": "lots"}, {"amount": None}),
    ("demo.invoice_payment", {"invoice_id": 3, "amount": "-5"}, {"amount": "Input should be greater than 0"}),
    ("demo.invoice_payment", {"invoice_id": 3, "amount": "1.005"}, {"amount": None}),
    ("demo.invoice_payment", {"invoice_id": "3", "amount": "1", "currency": "EUR"}, {"currency": EXTRA}),
    ("demo.invoice_payment", {"invoice_id": 3, "amount": "1", "\x00": "x"}, {"\\u0000": NUL_KEY}),
    ("demo.invoice_payment", {"invoice_id": 3, "amount": "12\x00"}, {"amount": NUL}),
    ("bench.noop", {"x": 1}, {"x": EXTRA}),
    ("bench.noop", {"note\x00": 1}, {"note\\u0000": NUL_KEY}),
    ("bench.noop", {"note": "\x00"}, {"note": NUL}),
]


def counts() -> tuple[int, int, int, int]:
    return Run.objects.count(), Step.objects.count(), TriggerEvent.objects.count(), Event.objects.count()


@pytest.fixture
def client(acme_operator: User) -> Client:
    return client_for(acme_operator)


def assert_refused(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return dict(error["details"])


def assert_still_starts_runs(client: Client, workflow: str = "demo.enrich_lead") -> None:
    before = counts()
    response = post_run(client, {"workflow": workflow, "input": VALID[workflow]})
    assert response.status_code == 201, response.content
    assert Run.objects.filter(pk=response.json()["id"], workflow=workflow).exists()
    assert counts()[0] == before[0] + 1


@pytest.mark.parametrize(("workflow_key", "bad_input", "errors"), BAD_INPUTS)
def test_it_refuses_input_that_does_not_fit_and_stores_nothing(
    client: Client, workflow_key: str, bad_input: dict[str, Any], errors: dict[str, str | None]
) -> None:
    before = counts()
    response = post_run(client, {"workflow": workflow_key, "input": bad_input, "trigger_event_id": "evt-bad"})
    fields = assert_refused(response, 422, "invalid_input")["fields"]
    assert set(fields) == set(errors), fields
    for path, message in errors.items():
        if message is not None:
            assert fields[path] == message
    assert counts() == before
    # The refused delivery did not claim its trigger id, and the system still does its job.
    again = post_run(
        client, {"workflow": workflow_key, "input": VALID[workflow_key], "trigger_event_id": "evt-bad"}
    )
    assert again.status_code == 201, again.content
    assert counts()[0] == before[0] + 1


def test_it_stores_the_normalized_input(client: Client) -> None:
    response = post_run(
        client, {"workflow": "demo.invoice_payment", "input": {"invoice_id": "3", "amount": 120}}
    )
    assert response.status_code == 201, response.content
    assert response.json()["input"] == {"invoice_id": 3, "amount": "120.00"}
    assert Run.objects.get(pk=response.json()["id"]).input == {"invoice_id": 3, "amount": "120.00"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workflow", "demo.enrich_lead\x00"),
        ("correlation_id", "deal\x0042"),
        ("trigger_event_id", "evt\x00"),
        ("tenant", "ac\x00me"),
    ],
)
def test_it_refuses_a_nul_character_in_the_request_fields(client: Client, field: str, value: str) -> None:
    before = counts()
    body = {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}, field: value}
    fields = assert_refused(post_run(client, body), 422, "invalid_input")["fields"]
    assert fields == {field: NUL}
    assert counts() == before
    assert_still_starts_runs(client)


def test_it_refuses_a_nul_character_or_an_overlong_idempotency_key(client: Client) -> None:
    before = counts()
    body = {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}}
    assert_refused(post_run(client, body, **{"Idempotency-Key": "evt\x00"}), 400, "invalid_request")
    assert_refused(post_run(client, body, **{"Idempotency-Key": "e" * 201}), 400, "invalid_request")
    assert counts() == before
    assert post_run(client, body, **{"Idempotency-Key": "e" * 200}).status_code == 201


def test_an_unknown_workflow_stays_a_400(client: Client) -> None:
    before = counts()
    details = assert_refused(
        post_run(client, {"workflow": "demo.nope", "input": {}}), 400, "unknown_workflow"
    )
    assert details == {}
    assert counts() == before


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"workflow": "demo.enrich_lead", "input": [1, 2]}, {"input"}),
        ({"workflow": "demo.enrich_lead", "input": "lead 7"}, {"input"}),
        ({"input": {"lead_id": 7}}, {"workflow"}),
        ({"workflow": 7, "input": {"lead_id": 7}}, {"workflow"}),
        (
            {"workflow": "demo.enrich_lead", "input": {"lead_id": 7}, "correlation_id": "c" * 201},
            {"correlation_id"},
        ),
        ([1, 2], {"workflow"}),
    ],
)
def test_a_body_that_does_not_fit_the_schema_is_a_422_with_field_errors(
    client: Client, body: Any, fields: set[str]
) -> None:
    before = counts()
    details = assert_refused(post_run(client, body), 422, "invalid_input")
    assert set(details["fields"]) == fields, details
    assert counts() == before
    assert_still_starts_runs(client)


@pytest.mark.parametrize(
    "body",
    [
        '{"workflow": "demo.enrich_lead", "input": {"lead_id": 7}',
        "not json at all",
        b'{"workflow": "demo.enrich_lead", "input": {"lead_id": "\xff"}}',
    ],
)
def test_a_malformed_body_is_a_400(client: Client, body: str | bytes) -> None:
    before = counts()
    assert_refused(post_run(client, body), 400, "malformed_json")
    assert counts() == before
    assert_still_starts_runs(client)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_numbers_json_cannot_hold_are_refused(client: Client, literal: str) -> None:
    before = counts()
    body = '{"workflow": "demo.enrich_lead", "input": {"lead_id": ' + literal + "}}"
    fields = assert_refused(post_run(client, body), 422, "invalid_input")["fields"]
    assert set(fields) == {"lead_id"}
    assert counts() == before


def test_an_oversized_body_is_a_413(client: Client) -> None:
    before = counts()
    body = {
        "workflow": "demo.enrich_lead",
        "input": {"lead_id": 7},
        "correlation_id": "x" * (3 * 1024 * 1024),
    }
    details = assert_refused(post_run(client, body), 413, "payload_too_large")
    assert details == {"limit_bytes": 1024 * 1024}
    assert counts() == before
    assert_still_starts_runs(client)


def test_a_nul_character_in_a_list_filter_is_a_422(client: Client) -> None:
    fields = assert_refused(client.get("/api/v1/runs", {"workflow": "demo\x00"}), 422, "invalid_input")[
        "fields"
    ]
    assert fields == {"workflow": NUL}
    assert client.get("/api/v1/runs", {"workflow": "demo.enrich_lead"}).status_code == 200


def test_a_nul_character_in_a_run_id_is_a_404(client: Client) -> None:
    assert_refused(client.get("/api/v1/runs/run_%00"), 404, "not_found")
    assert_refused(client.post("/api/v1/runs/run_%00/cancel"), 404, "not_found")


def test_run_start_refuses_before_storing_anything(acme: Tenant) -> None:
    before = counts()
    with pytest.raises(InvalidInput) as refused:
        run_start(
            tenant=acme,
            workflow="demo.crm_update",
            input={"contact_id": 1, "changes": {}},
            actor="t",
            trigger_event_id="evt-1",
        )
    assert refused.value.fields == {"changes.stage": REQUIRED}
    assert counts() == before


def test_start_run_lists_the_field_errors_and_fails(acme: Tenant) -> None:
    before = counts()
    with pytest.raises(CommandError) as refused:
        call_command(
            "start_run",
            "demo.crm_update",
            "--tenant",
            "acme",
            "--input",
            '{"contact_id": "x", "changes": {"stage": "won", "colour": "red"}}',
            stdout=StringIO(),
        )
    message = str(refused.value)
    assert "does not fit workflow demo.crm_update" in message
    assert "contact_id: Input should be a valid integer" in message
    assert f"changes.colour: {EXTRA}" in message
    assert counts() == before
    out = StringIO()
    call_command(
        "start_run",
        "demo.crm_update",
        "--tenant",
        "acme",
        "--input",
        json.dumps(VALID["demo.crm_update"]),
        stdout=out,
    )
    assert out.getvalue().startswith("started: run_")


@pytest.mark.parametrize(
    ("workflow_key", "raw", "normalized"),
    [
        ("demo.invoice_payment", {"invoice_id": 3, "amount": "120"}, {"invoice_id": 3, "amount": "120.00"}),
        ("demo.invoice_payment", {"invoice_id": "3", "amount": 120.5}, {"invoice_id": 3, "amount": "120.50"}),
        ("demo.invoice_payment", {"invoice_id": 3, "amount": "1e2"}, {"invoice_id": 3, "amount": "100.00"}),
        ("demo.enrich_lead", {"lead_id": "7"}, {"lead_id": 7}),
        (
            "demo.crm_update",
            {"contact_id": 1, "changes": {"stage": "won"}},
            {"contact_id": 1, "changes": {"stage": "won"}},
        ),
        (
            "demo.crm_update",
            {"contact_id": 1, "changes": {"stage": "won", "email": "a@example.com"}},
            {"contact_id": 1, "changes": {"stage": "won", "email": "a@example.com"}},
        ),
        ("bench.noop", {}, {}),
        ("test.sleepy", {}, {"sleep_seconds": 3.0}),
        ("test.busy_crm", {"hold_seconds": "0.5"}, {"hold_seconds": 0.5}),
    ],
)
def test_validate_input_normalizes(
    workflow_key: str, raw: dict[str, Any], normalized: dict[str, Any]
) -> None:
    assert get_workflow(workflow_key).validate_input(raw) == normalized


def test_validate_input_collects_every_field_error() -> None:
    with pytest.raises(InvalidInput) as refused:
        get_workflow("demo.invoice_payment").validate_input({"amount": "0", "memo": "x\x00"})
    assert refused.value.fields == {
        "invoice_id": REQUIRED,
        "amount": "Input should be greater than 0",
        "memo": NUL,
    }
    assert "invoice_payment" in str(refused.value)


def test_a_workflow_without_a_model_takes_any_storable_object() -> None:
    free = Workflow(key="t.free")
    anything = {"anything": [1, {"goes": True}], "even": None}
    assert free.validate_input(anything) == anything
    with pytest.raises(InvalidInput) as refused:
        free.validate_input({"a": ["ok", "n\x00"], "b\x00": 1, "c": {"d": float("nan")}})
    assert refused.value.fields == {
        "a.1": NUL,
        "b\\u0000": NUL_KEY,
        "c.d": "Input should be a finite number",
    }


@pytest.fixture
def registered() -> Iterator[list[str]]:
    keys: list[str] = []
    yield keys
    for key in keys:
        unregister(key)


def test_a_plain_model_forbids_extra_fields_unless_it_opts_out(registered: list[str]) -> None:
    class Plain(BaseModel):
        n: int

    class Lenient(BaseModel):
        model_config = ConfigDict(extra="ignore")
        n: int

    plain = workflow("t.plain", input=Plain)
    lenient = workflow("t.lenient", input=Lenient)
    registered.extend(["t.plain", "t.lenient"])
    with pytest.raises(InvalidInput) as refused:
        plain.validate_input({"n": 1, "m": 2})
    assert refused.value.fields == {"m": EXTRA}
    assert lenient.validate_input({"n": 1, "m": 2}) == {"n": 1}
