"""``manage.py bench_step_cost`` runs the step chain a busy worker runs and accounts for it."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from runs.models import Run, RunStatus


@pytest.mark.django_db(transaction=True)
def test_it_runs_every_step_of_the_chain_and_reports_its_cost() -> None:
    out = io.StringIO()
    call_command("bench_step_cost", runs=6, any_database=True, stdout=out)
    report = out.getvalue()
    assert "steps run in one chain: 6 of 6" in report
    per_step = re.search(r"per step: ([\d.]+) ms wall, ([\d.]+) statements, ([\d.]+) ms inside them", report)
    assert per_step is not None, report
    wall, statements, inside = (float(x) for x in per_step.groups())
    assert statements > 0 and 0 < inside < wall
    cpu = re.search(r"CPU per step: ([\d.]+) ms in this process, ([\d.]+|nan) ms in its PostgreSQL", report)
    assert cpu is not None and float(cpu.group(1)) > 0, report
    assert Run.objects.filter(actor="bench_step_cost", status=RunStatus.SUCCEEDED).count() == 6


@pytest.mark.django_db(transaction=True)
def test_by_statement_each_statement_is_one_line_and_a_prepared_one_shows_its_sql() -> None:
    out = io.StringIO()
    call_command("bench_step_cost", runs=6, any_database=True, by_statement=True, stdout=out)
    report = out.getvalue()
    total = float(re.search(r"([\d.]+) statements,", report).group(1))  # type: ignore[union-attr]
    lines = re.findall(r"^\s*([\d.]+)/step\s+([\d.]+) ms/step  (.+)$", report, re.MULTILINE)
    assert lines, report
    statements = [sql for _, _, sql in lines]
    assert len(statements) == len(set(statements)), report  # one line per statement
    assert not any("EXECUTE rw_" in sql for sql in statements), report  # shown as their SQL
    assert abs(sum(float(count) for count, _, _ in lines) - total) < 0.01 * len(lines) + 0.05
    if connection.vendor == "postgresql":  # the step chain prepares its statements there
        assert any(sql.startswith("[prepared] WITH RECURSIVE tenants") for sql in statements), report


@pytest.mark.django_db
def test_it_refuses_a_database_not_meant_for_benches() -> None:
    with pytest.raises(CommandError, match="named \\*bench\\*"):
        call_command("bench_step_cost", runs=1)
