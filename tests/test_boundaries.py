"""Dependencies stay at their edge: each heavy library is imported by one module (or package) only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

ALLOWED = {
    "ray": {"launch/ray_job.py"},
    "deepspeed": {"trainer/engine.py"},
    "mlflow": {"trainer/tracking.py", "launch/runs.py"},
    "bitsandbytes": {"trainer/model.py", "trainer/adapters/base_layers.py"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("library", sorted(ALLOWED))
def test_library_imported_only_at_its_edge(library: str) -> None:
    sources = [p for pkg in ("trainer", "launch") for p in (ROOT / pkg).rglob("*.py")]
    importers = {str(p.relative_to(ROOT)) for p in sources if library in _imports(p)}
    assert importers, f"nothing imports {library}: is the table stale?"
    assert importers <= ALLOWED[library], (
        f"{library} imported outside its edge: {importers - ALLOWED[library]}"
    )
