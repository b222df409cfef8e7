"""approvals changes runs' rows only through runs' services (DESIGN "Layout"): no write to a
runs model is spelled anywhere in approvals/, and the resolutions that used to write them
directly still move the step and its run the same way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from django.apps import apps
from django.db import transaction

from approvals import services
from approvals.models import ConflictArtifact, ConflictKind
from core.models import Event, Tenant, User
from runs import transitions
from runs.models import Run, RunStatus, Step, StepStatus
from runs.services import run_start
from tests.approvals.helpers import pending_request, pump

WRITES = {
    "update", "create", "delete", "save", "bulk_create", "bulk_update", "get_or_create",
    "update_or_create", "add", "remove", "clear", "set",
}  # fmt: skip
MANAGERS = {"objects", "_default_manager", "_base_manager"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _runs_names() -> tuple[set[str], set[str], set[str]]:
    """Runs' model class names; the names an instance of one goes by (``step``, ``side_effect``,
    ``effect``); and the relation accessors, on any model, that lead to runs' rows (``steps``)."""
    models = set(apps.get_app_config("runs").get_models())
    classes = {model.__name__ for model in models}
    instances = {_snake(name) for name in classes} | {name.lower() for name in classes} | {"effect"}
    accessors = {
        name
        for model in apps.get_models()
        for rel in model._meta.related_objects
        if rel.related_model in models and (name := rel.get_accessor_name())
    }
    return classes, instances, accessors


def _last_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _reaches_runs_rows(node: ast.expr, classes: set[str], accessors: set[str], tainted: set[str]) -> bool:
    """Whether a receiver chain (``Step.objects.filter(...)``, ``run.steps``, a name bound to
    such a queryset) stands for runs' rows."""
    while True:
        if isinstance(node, ast.Attribute):
            if node.attr in MANAGERS and _last_name(node.value) in classes:
                return True
            if node.attr in accessors:
                return True
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Name):
            return node.id in tainted
        else:
            return False


def runs_writes(source: str, filename: str = "<source>") -> list[str]:
    """Every write to a runs model in ``source``, as ``file:line: code``."""
    classes, instances, accessors = _runs_names()
    tree = ast.parse(source, filename)
    tainted: set[str] = set()
    for node in ast.walk(tree):  # names bound to runs querysets or rows: qs = Step.objects...
        if not isinstance(node, ast.Assign | ast.AnnAssign | ast.NamedExpr) or node.value is None:
            continue
        values = [sub for sub in ast.walk(node.value) if isinstance(sub, ast.expr)]
        if any(_reaches_runs_rows(sub, classes, accessors, set()) for sub in values):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            tainted |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        method, receiver = node.func.attr, node.func.value
        if method not in WRITES:
            continue
        on_instance = method in ("save", "delete") and _last_name(receiver) in instances
        if on_instance or _reaches_runs_rows(receiver, classes, accessors, tainted):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}")
    return found


def _tables() -> set[str]:
    return {model._meta.db_table for model in apps.get_app_config("runs").get_models()}


def test_approvals_writes_no_runs_rows_itself() -> None:
    root = Path(apps.get_app_config("approvals").path)
    sources = {
        path: path.read_text() for path in sorted(root.rglob("*.py")) if "migrations" not in path.parts
    }
    assert sources, f"no approvals sources found under {root}"
    writes = [hit for path, text in sources.items() for hit in runs_writes(text, str(path.relative_to(root)))]
    assert not writes, "approvals writes runs' rows; call a runs service instead:\n" + "\n".join(writes)
    raw = [
        f"{path.name}: {table}"
        for path, text in sources.items()
        for table in _tables()
        if re.search(rf"\b{table}\b", text)
    ]
    assert not raw, f"approvals names runs' tables in raw SQL: {raw}"


@pytest.mark.parametrize(
    "code",
    [
        "Step.objects.filter(pk=1, status='conflict').update(status='ready')",
        "SideEffect.objects.create(idempotency_key='k')",
        "Run.objects.filter(pk=run_id).delete()",
        "Step.objects.bulk_create(steps)",
        "models.SideEffect.objects.filter(pk=1).update(status='failed')",
        "pending = Step.objects.filter(pk=1)\npending.update(status='ready')",
        "run.steps.filter(position__gt=2).update(status='pending')",
        "tenant.runs.create(workflow='w')",
        "request.step.save(update_fields=['status'])",
        "conflict.effect.delete()",
        "step.status = 'ready'\nstep.save()",
    ],
)
def test_the_check_sees_writes_to_runs_rows(code: str) -> None:
    assert runs_writes(code), code


@pytest.mark.parametrize(
    "code",
    [
        "Step.objects.filter(run_id=run_id).values_list('output', flat=True).first()",
        "ApprovalRequest.objects.filter(pk=1).update(status='approved')",
        "ConflictArtifact.objects.create(kind='stale_approval', step=step)",
        "artifact.save()",
        "run_services.step_resume(step=step, actor='me')",
    ],
)
def test_the_check_leaves_reads_and_approvals_own_rows_alone(code: str) -> None:
    assert not runs_writes(code), code


@pytest.mark.both_dialects
@pytest.mark.django_db(transaction=True)
def test_keeping_the_edit_that_staled_an_approval_waits_for_a_decision_again(
    sandbox_acme: Tenant, acme_operator: User, acme_reviewer: User
) -> None:
    run = run_start(
        tenant=sandbox_acme, workflow="demo.lead_followup", input={"lead_id": 7, "contact_id": 1}, actor="bot"
    ).run
    assert pump() == ["succeeded", "succeeded", "waiting_approval"]
    send = Step.objects.get(run=run, key="send_message")
    with transaction.atomic():
        assert transitions.step_conflict(
            step=send,
            kind=ConflictKind.STALE_APPROVAL,
            error="the artifact changed after it was approved",
            from_statuses=(StepStatus.WAITING_APPROVAL,),
        )
    conflict = ConflictArtifact.objects.get(kind=ConflictKind.STALE_APPROVAL, step=send)
    services.conflict_resolve(
        conflict=conflict, user=acme_reviewer, expected_version=conflict.version, resolution="keep_current"
    )
    send.refresh_from_db()
    run.refresh_from_db()
    assert (send.status, run.status) == (StepStatus.WAITING_APPROVAL, RunStatus.WAITING_APPROVAL)
    assert Event.objects.filter(
        subject=f"run:{run.id}", verb="step_waiting_approval", actor=acme_reviewer.get_username()
    ).exists()
    # The step no longer in conflict: a second move does nothing.
    assert not transitions.step_await_approval(step=send, actor=acme_reviewer.get_username())
    # The decision it waits for resumes it, and the run finishes.
    request = pending_request(run)
    services.approval_decide(
        request=request, user=acme_operator, decision="approve", expected_version=request.version
    )
    assert pump() == ["succeeded"]
    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED
