"""An agent's refund waits mid-step for an operator in the browser: the inbox marks the tool
call (no "request changes" for a call), the approval lets the step run on, and the run page
shows each tool call on the timeline and in its table. axe-core finds nothing on either."""

from __future__ import annotations

import threading

from playwright.sync_api import Page, expect

from approvals.models import ApprovalRequest, ApprovalStatus
from core.models import Tenant, User
from core.services import api_token_issue
from runs.models import Run, RunStatus, ToolCall
from runs.services import run_start
from runwarden.client import Runwarden
from tests.approvals.helpers import pump, pump_until
from tests.e2e.conftest import login, screenshot
from tests.e2e.helpers import elsewhere, go_live
from tests.e2e.test_accessibility import _violations


def agent_waiting_for_a_refund() -> ApprovalRequest:
    run = run_start(
        tenant=Tenant.objects.get(slug="acme"),
        workflow="demo.support_agent",
        input={"contact_id": 2, "ticket": "I was charged twice, please refund 150", "payment_id": "pay_42"},
        actor="support-bot",
    ).run
    pump()
    return ApprovalRequest.objects.select_related("artifact").get(run=run, status=ApprovalStatus.PENDING)


def finish(run_id: str) -> None:
    pump_until(lambda: Run.objects.get(pk=run_id).status == RunStatus.SUCCEEDED)


def test_an_operator_approves_an_agents_refund_mid_step_and_sees_its_calls(
    live_console: str, page: Page
) -> None:
    request = elsewhere(agent_waiting_for_a_refund)
    login(page, live_console, "operator")
    go_live(page, live_console, "/approvals/")
    card = page.locator(f"#approval-{request.pk}")
    expect(card).to_contain_text(f"payments call #{request.artifact.call_key}")
    expect(card).to_contain_text("150.00")
    expect(card.get_by_role("button", name="Request changes")).to_have_count(0)
    assert _violations(page) == []
    screenshot(page, "inbox-tool-call")
    card.get_by_role("button", name="Approve", exact=True).click()
    expect(card.locator(".badge")).to_have_text("approved")

    elsewhere(finish, request.run_id)
    page.goto(f"{live_console}/runs/{request.run_id}/")
    table = page.locator("table.tool-calls")
    expect(table).to_be_visible()
    calls = ToolCall.objects.filter(run_id=request.run_id).count()
    expect(table.locator("tbody tr")).to_have_count(calls)
    expect(table).to_contain_text("payments")
    expect(table.locator("tbody tr", has_text="payments")).to_contain_text(f"request {request.pk}")
    expect(page.locator("figure.timeline rect.call")).to_have_count(calls)
    page.wait_for_load_state("networkidle")
    assert _violations(page) == []
    screenshot(page, "run-detail-tool-calls")


def outside_agent_asks(token: str, base_url: str) -> str:
    """An agent outside Runwarden asks, over HTTP, for a refund to be approved."""
    return Runwarden(base_url, token=token, tenant="acme").ask_approval(
        "payments.refund", {"amount": "75.00"}
    )


def test_an_outside_agents_request_is_decided_in_the_browser_and_its_long_poll_returns_it(
    live_console: str, page: Page
) -> None:
    token = elsewhere(lambda: api_token_issue(user=User.objects.get(username="admin"), name="outside agent"))
    decision_id = outside_agent_asks(token, live_console)
    elsewhere(pump)  # a worker opens the request
    request = elsewhere(lambda: ApprovalRequest.objects.get(run_id=decision_id))
    answers: list[dict] = []

    def long_poll() -> None:
        answers.append(Runwarden(live_console, token=token).decision(decision_id, wait=30))

    waiting = threading.Thread(target=long_poll)
    waiting.start()
    login(page, live_console, "operator")
    go_live(page, live_console, "/approvals/")
    card = page.locator(f"#approval-{request.pk}")
    expect(card).to_contain_text("payments.refund call #action")
    card.get_by_role("button", name="Approve", exact=True).click()
    expect(card.locator(".badge")).to_have_text("approved")
    elsewhere(pump)  # a worker records the approved action: the long-poll answers then
    waiting.join(40)
    assert answers and answers[0]["status"] == "approved", answers
    assert answers[0]["action"] == {"amount": "75.00"} and answers[0]["decided_by"] == "operator"
