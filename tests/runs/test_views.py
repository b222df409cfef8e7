from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client, override_settings
from pytest_django import DjangoAssertNumQueries

from core.leases import lease_acquire
from core.models import Event, Tenant, User
from runs.dispatch import dispatch_round
from runs.models import Run, RunStatus, StepStatus
from runs.selectors import ownership_board
from runs.services import run_start
from tests.conftest import client_for

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}


def start(tenant: Tenant, **kwargs: Any) -> Run:
    kwargs.setdefault("input", {"lead_id": 7})
    return run_start(tenant=tenant, workflow="demo.enrich_lead", actor="t", **kwargs).run


def rows(body: bytes) -> list[str]:
    """The run ids of the table rows, in page order."""
    return re.findall(r'<tr id="run-(run_\w+)"', body.decode())


def test_it_lists_the_runs_of_the_users_tenants_only(
    acme: Tenant, globex: Tenant, acme_operator: User
) -> None:
    older, newer = start(acme), start(acme)
    foreign = start(globex)
    response = client_for(acme_operator).get("/runs/")
    assert response.status_code == 200
    assert rows(response.content) == [newer.id, older.id]  # newest first, no other tenant's
    assert foreign.id not in response.content.decode()
    assert f'href="/runs/{newer.id}/"' in response.content.decode()


def test_it_filters_by_status_workflow_correlation_id_and_tenant(
    acme: Tenant, globex: Tenant, acme_operator: User, globex_operator: User
) -> None:
    plain = start(acme)
    correlated = start(acme, correlation_id="deal-42")
    cancelled = start(acme)
    Run.objects.filter(pk=cancelled.pk).update(status=RunStatus.CANCELLED)
    client = client_for(acme_operator)

    def listed(query: str) -> set[str]:
        return set(rows(client.get("/runs/" + query).content))

    assert listed("?status=cancelled") == {cancelled.id}
    assert listed("?status=pending") == {plain.id, correlated.id}
    assert listed("?correlation_id=deal-42") == {correlated.id}
    assert listed("?workflow=demo.enrich_lead") == {plain.id, correlated.id, cancelled.id}
    assert listed("?workflow=demo.crm_update") == set()
    assert listed("?tenant=acme") == {plain.id, correlated.id, cancelled.id}
    # Naming another tenant in the filter shows nothing of it.
    start(globex, correlation_id="deal-42")
    assert listed("?tenant=globex") == set()


def test_it_pages_with_an_older_link(acme: Tenant, acme_operator: User) -> None:
    runs = [start(acme) for _ in range(3)]
    client = client_for(acme_operator)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("runs.views.PAGE_SIZE", 2)
        first = client.get("/runs/")
        assert rows(first.content) == [runs[2].id, runs[1].id]
        assert f'href="?cursor={runs[1].id}">Older' in first.content.decode()
        older = client.get(f"/runs/?cursor={runs[1].id}")
    assert rows(older.content) == [runs[0].id]
    assert "Older" not in older.content.decode()


def test_an_htmx_request_gets_only_the_table_fragment(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    response = client_for(acme_operator).get("/runs/?status=pending", headers=HTMX)
    assert response.status_code == 200
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="runs-table"')
    assert run.id in body
    assert "<html" not in body and 'id="runs-filter"' not in body
    # The fragment carries the filters in force, for the live refresh to re-send.
    assert '<input type="hidden" name="status" value="pending">' in body


def test_the_list_page_makes_a_bounded_number_of_queries(
    acme: Tenant, globex: Tenant, acme_operator: User, django_assert_max_num_queries: DjangoAssertNumQueries
) -> None:
    for n in range(20):
        start(acme, input={"lead_id": n + 1})
    client = client_for(acme_operator)
    with django_assert_max_num_queries(10):
        response = client.get("/runs/")
    assert len(rows(response.content)) == 20


def test_it_shows_a_run_with_its_steps_leases_effects_and_events(acme: Tenant, acme_operator: User) -> None:
    run = start(acme, correlation_id="deal-42")
    lease_acquire(
        tenant_id=acme.pk, key="crm_contact:1", holder="worker-1", ttl=30, metadata={"run_id": run.id}
    )
    step = run.steps.get(key="fetch_lead")
    step.lock_keys = ["crm_contact:1"]
    step.output = {"lead": {"id": 7, "name": "Ada"}}
    step.save(update_fields=["lock_keys", "output"])
    response = client_for(acme_operator).get(f"/runs/{run.id}/")
    assert response.status_code == 200
    body = response.content.decode()
    for text in (run.id, "deal-42", "fetch_lead", "summarize", "draft_note", "crm_contact:1", "worker-1"):
        assert text in body
    assert "{&quot;lead&quot;:{&quot;id&quot;:7,&quot;name&quot;:&quot;Ada&quot;}}" in body
    # The "created" event of the run is listed.
    assert Event.objects.get(subject=f"run:{run.id}").verb == "created"
    assert ">created<" in body
    assert "Cancel run" in body


def test_it_answers_404_for_another_tenants_run(acme: Tenant, globex: Tenant, globex_operator: User) -> None:
    run = start(acme)
    client = client_for(globex_operator)
    assert client.get(f"/runs/{run.id}/").status_code == 404
    assert client.get("/runs/run_nope/").status_code == 404
    assert client.post(f"/runs/{run.id}/cancel/").status_code == 404
    assert Run.objects.get(pk=run.pk).status == RunStatus.PENDING


def test_it_sends_anonymous_users_to_the_login_page(acme: Tenant) -> None:
    run = start(acme)
    for url in ("/runs/", f"/runs/{run.id}/", "/leases/"):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_an_htmx_detail_request_gets_only_the_detail_fragment(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    body = client_for(acme_operator).get(f"/runs/{run.id}/", headers=HTMX).content.decode()
    assert body.lstrip().startswith('<div id="run-detail"')
    assert "<html" not in body


def test_an_operator_cancels_a_run_and_is_redirected_back(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    response = client_for(acme_operator).post(f"/runs/{run.id}/cancel/")
    assert response.status_code == 302
    assert response["Location"] == f"/runs/{run.id}/"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert set(run.steps.values_list("status", flat=True)) == {StepStatus.CANCELLED}
    event = Event.objects.get(subject=f"run:{run.id}", verb="cancelled")
    assert (event.actor, event.payload["reason"]) == ("operator", "cancelled by operator")


def test_an_htmx_cancel_re_renders_the_detail_fragment(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    response = client_for(acme_operator).post(f"/runs/{run.id}/cancel/", headers=HTMX)
    assert response.status_code == 200
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="run-detail"')
    assert "status-cancelled" in body
    assert f"Run {run.id} cancelled." in body
    assert "Cancel run" not in body  # a finished run offers no cancel button
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED


def test_cancelling_a_finished_run_changes_nothing_and_says_so(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    Run.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
    client = client_for(acme_operator)
    response = client.post(f"/runs/{run.id}/cancel/", headers=HTMX)
    assert response.status_code == 409  # the run's state refused it; the page swaps the notice in
    assert "had already finished" in response.content.decode()
    follow = client.post(f"/runs/{run.id}/cancel/", follow=True)
    assert "had already finished" in follow.content.decode()
    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED
    assert not Event.objects.filter(verb="cancelled").exists()


def test_a_reviewer_may_not_cancel_and_sees_no_button(acme: Tenant, acme_reviewer: User) -> None:
    run = start(acme)
    client = client_for(acme_reviewer)
    assert "Cancel run" not in client.get(f"/runs/{run.id}/").content.decode()
    assert client.post(f"/runs/{run.id}/cancel/").status_code == 403
    assert client.post(f"/runs/{run.id}/cancel/", headers=HTMX).status_code == 403
    assert Run.objects.get(pk=run.pk).status == RunStatus.PENDING
    assert not Event.objects.filter(verb="cancelled").exists()


def test_cancel_needs_a_csrf_token(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    client = Client(enforce_csrf_checks=True)
    client.force_login(acme_operator)
    assert client.post(f"/runs/{run.id}/cancel/").status_code == 403
    assert client.post(f"/runs/{run.id}/cancel/", headers=HTMX).status_code == 403
    assert Run.objects.get(pk=run.pk).status == RunStatus.PENDING
    # With the token the page hands out (the hx-headers on <body>), it goes through.
    client.get(f"/runs/{run.id}/")
    token = client.cookies["csrftoken"].value
    response = client.post(f"/runs/{run.id}/cancel/", headers={**HTMX, "X-CSRFToken": token})
    assert response.status_code == 200
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED


def test_cancel_answers_only_post(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    assert client_for(acme_operator).get(f"/runs/{run.id}/cancel/").status_code == 405
    assert Run.objects.get(pk=run.pk).status == RunStatus.PENDING


def test_the_lease_board_lists_live_leases_of_the_users_tenants_only(
    acme: Tenant, globex: Tenant, acme_operator: User
) -> None:
    run = start(acme)
    grant = lease_acquire(
        tenant_id=acme.pk, key="crm_contact:1", holder="x", ttl=30, metadata={"run_id": run.id}
    )
    assert grant is not None
    lease_acquire(tenant_id=globex.pk, key="crm_contact:99", holder="globex-worker", ttl=30)
    lease_acquire(tenant_id=acme.pk, key="crm_contact:2", holder="gone", ttl=-1)  # already expired
    response = client_for(acme_operator).get("/leases/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "crm_contact:1" in body
    assert f'href="/runs/{run.id}/"' in body
    assert f">{grant.token}<" in body
    assert "crm_contact:99" not in body and "globex-worker" not in body
    # Past its expiry and never released: listed, marked stale (anyone may take it over).
    stale = body[body.index('data-key="crm_contact:2"') - 60 :][:400]
    assert "stale" in stale


def test_an_htmx_lease_board_request_gets_only_the_fragment(acme: Tenant, acme_operator: User) -> None:
    lease_acquire(
        tenant_id=acme.pk, key="crm_contact:1", holder="x", ttl=30, metadata={"run_id": "not/a run"}
    )
    body = client_for(acme_operator).get("/leases/", headers=HTMX).content.decode()
    assert body.lstrip().startswith('<div id="lease-board"')
    assert "crm_contact:1" in body
    assert "not/a run" not in body  # free-form metadata is not turned into a link


@pytest.mark.parametrize(
    ("path", "fragment"),
    [("/runs/", "#runs-table"), ("/runs/{run}/", "#run-detail"), ("/leases/", "#lease-board")],
)
def test_each_page_refetches_its_fragment_on_live_events(
    acme: Tenant, acme_operator: User, path: str, fragment: str
) -> None:
    run = start(acme)
    body = client_for(acme_operator).get(path.format(run=run.id)).content.decode()
    refresher = re.search(r"<div hidden hx-get=[^>]*>", body)
    assert refresher is not None
    assert f'hx-target="{fragment}"' in refresher.group()
    assert "live:event" in refresher.group() and "live:resync from:body" in refresher.group()


def test_a_status_reads_in_words_with_its_key_on_hover(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    Run.objects.filter(pk=run.pk).update(status=RunStatus.WAITING_APPROVAL)
    run.steps.filter(position=0).update(status=StepStatus.LEASED)
    body = client_for(acme_operator).get(f"/runs/{run.id}/").content.decode()
    assert (
        '<span class="badge status-waiting_approval" title="waiting_approval">waiting for approval</span>'
        in body
    )
    assert '<span class="badge status-leased" title="leased">admitted</span>' in body


def test_the_overview_says_what_counts_as_a_lock_wait(acme: Tenant, acme_operator: User) -> None:
    body = client_for(acme_operator).get("/").content.decode()
    assert '<p class="small" id="fig-lock-wait" aria-describedby="lock-wait-help">Lock waits: ' in body
    help_text = re.search(r'<p class="muted small" id="lock-wait-help">(.*?)</p>', body)
    assert help_text is not None
    assert "A lock wait is a step admitted with an entity lock" in help_text.group(1)
    assert "from ready to admission" in help_text.group(1)


def test_the_overview_chart_has_labelled_axes_with_units(acme: Tenant, acme_operator: User) -> None:
    for _ in range(3):
        start(acme)
    body = client_for(acme_operator).get("/").content.decode()
    assert '<span class="chart-y-title small muted" id="chart-y-title">runs per minute</span>' in body
    assert '<div class="chart-y small" id="chart-y"><span>3</span><span>0</span></div>' in body
    assert "time (UTC), one bar per minute" in body
    x_ticks = re.search(r'<div class="chart-x small" id="chart-x">(.*?)</div>', body)
    assert x_ticks is not None
    assert len(re.findall(r"<span>\d\d:\d\d</span>", x_ticks.group(1))) == 3


def test_a_run_not_started_yet_says_so_beside_its_ready_step(acme: Tenant, acme_operator: User) -> None:
    run = start(acme)
    client = client_for(acme_operator)
    badge = '<span class="badge status-pending" title="pending">waiting to start</span>'
    assert badge in client.get("/runs/").content.decode()
    detail = client.get(f"/runs/{run.id}/").content.decode()
    assert badge in detail
    assert '<span class="badge status-ready" title="ready">ready</span>' in detail


@override_settings(
    RUNWARDEN_CAPS={"global": 50, "tenant_default": 10, "workflow": {}, "lane": {}, "tool": {}}
)
def test_the_board_shows_a_runs_step_lease_and_its_entity_lock_on_one_card(
    sandbox_acme: Tenant, acme_operator: User
) -> None:
    data = {"contact_id": 1, "changes": {"stage": "won"}}
    run = run_start(tenant=sandbox_acme, workflow="demo.crm_update", input=data, actor="t").run
    [admission] = dispatch_round()  # the step's lease and the contact's lock, both the run's
    lease_acquire(tenant_id=sandbox_acme.pk, key="crm_contact:9", holder="nightly-import", ttl=30)
    board = ownership_board(acme_operator)
    assert [(card["run_id"], [h["key"] for h in card["holds"]]) for card in board] == [
        (run.id, ["crm_contact:1", f"step:{admission.step_id}"]),  # the lock first, then the step lease
        (None, ["crm_contact:9"]),  # a holder outside the engine: a card of its own
    ]
    assert (
        board[0]["step_keys"] == ["apply_changes"]
        and board[0]["keys"] == f"crm_contact:1 step:{admission.step_id}"
    )
    body = client_for(acme_operator).get("/leases/").content.decode()
    assert body.count('class="card board-row') == 2
    card = body[body.index(f'data-keys="crm_contact:1 step:{admission.step_id}"') :]
    card = card[: card.index("</article>")]
    assert f'<a class="mono key" href="/runs/{run.id}/">{run.id}</a>' in card
    assert '· <span title="leased">admitted</span> ·' in card  # the step's state, in the badges' words
    assert card.index('data-key="crm_contact:1"') < card.index(f'data-key="step:{admission.step_id}"')
    assert (
        ">step lease</span>" in card and f'fencing token <span class="mono">{admission.token}</span>' in card
    )


def test_the_run_pages_leases_show_their_fencing_token_only_when_opened(
    acme: Tenant, acme_operator: User
) -> None:
    run = start(acme)
    step = run.steps.get(position=0)
    grant = lease_acquire(
        tenant_id=acme.pk, key=f"step:{step.pk}", holder="w", ttl=30, metadata={"run_id": run.id}
    )
    assert grant is not None
    body = client_for(acme_operator).get(f"/runs/{run.id}/").content.decode()
    assert f'<td>step lease <span class="mono">step:{step.pk}</span></td>' in body
    token = f'<summary>show</summary><span class="mono">{grant.token}</span></details></td>'
    assert f'<td><details class="wait-more">{token}' in body


def test_the_status_filter_offers_the_states_in_the_badges_words(acme: Tenant, acme_operator: User) -> None:
    body = client_for(acme_operator).get("/runs/").content.decode()
    assert '<option value="pending">waiting to start</option>' in body
    assert '<option value="waiting_approval">waiting for approval</option>' in body
