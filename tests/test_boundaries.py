"""Dependencies stay at their edge: each heavy library is imported by one module (or package) only."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

# Where each library may be imported: a module, or a package (a path ending in "/": any module under it).
ALLOWED = {
    "ray": {"launch/ray_job.py", "launch/ray_sweep.py"},  # Ray Train runs; Ray Tune sweeps of them
    "deepspeed": {"trainer/engine.py"},
    "mlflow": {"trainer/tracking/", "launch/runs.py"},
    "bitsandbytes": {"trainer/model/", "trainer/adapters/base_layers.py"},
}


def _allowed(path: str, edges: set[str]) -> bool:
    return any(path == edge or (edge.endswith("/") and path.startswith(edge)) for edge in edges)


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
    outside = {path for path in importers if not _allowed(path, ALLOWED[library])}
    assert not outside, f"{library} imported outside its edge: {outside}"


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build killed mid-way leaves torch's lock file behind, and the next run would wait on it forever."""
    from launch.env import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_build_locks() == [stale]
    assert not stale.exists() and fresh.exists()
