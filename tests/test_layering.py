"""No import cycles in the product, in-function and type-only imports included: a module can be
read after the modules it imports, never needing one that needs it back. (Which app may import
which is import-linter's contract in pyproject.toml, run by ``make lint``.)"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

PACKAGES = ("core", "runs", "approvals", "demo", "bench")


def import_cycles(graph: grimp.ImportGraph) -> list[str]:
    """Each direct import that a chain of imports leads back from, as ``a -> b -> … -> a``."""
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    return cycles


def test_the_product_has_no_import_cycle() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert len(graph.modules) > 50, "the graph must hold the product's modules"
    assert import_cycles(graph) == []


def test_a_type_only_or_in_function_import_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "cyclepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclepkg import b\n")
    (package / "b.py").write_text("def f():\n    from cyclepkg import c\n")
    (package / "c.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles(grimp.build_graph("cyclepkg", cache_dir=None)) == []

    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyclepkg import a\n"
    )
    cycles = import_cycles(grimp.build_graph("cyclepkg", cache_dir=None))
    assert "cyclepkg.a -> cyclepkg.b -> cyclepkg.c -> cyclepkg.a" in cycles
