"""Atomic writes killed mid-way (SIGKILL, no clean-up): the previous artefact survives and is found.

Each crash is a child process that kills itself at one exact point of the write, so the point is not
left to timing: after the data is written but before the rename (files), between the two renames of a
directory swap, and while a directory is being filled.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer.checkpoints import atomic_dir, atomic_write_text, resolve_dir

pytestmark = pytest.mark.unit

# Fault injection in the child: kill the process (no finally, no atexit) when ``fn`` is called the
# ``n``-th time; everything before that point has happened, nothing after it.
KILL_AT = """
import os, signal
def kill_at(owner, name, n):
    original, calls = getattr(owner, name), [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)
"""


IMPORTS = "from pathlib import Path\nfrom trainer.checkpoints import atomic_dir, atomic_write_text\n"


def _crash(kill: str, body: str) -> None:
    """Run ``body`` in a child process that ``kill`` (a ``kill_at`` call) makes die at one point."""
    code = f"{KILL_AT}\n{IMPORTS}\n{kill}\n{body}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_file_killed_before_its_rename_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    # killed at the fsync: the new bytes are in the temporary file, the rename never happens
    _crash("kill_at(os, 'fsync', 1)", f"atomic_write_text({str(target)!r}, 'new' * 100_000)")
    assert target.read_text() == "old"
    leftovers = list(tmp_path.glob(".summary.json.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 300_000, "the write did not get mid-way"
    atomic_write_text(target, "newer")
    assert target.read_text() == "newer"


def _write_dir(path: Path, version: str) -> None:
    with atomic_dir(path) as tmp:
        (tmp / "weights").write_text(version)


def test_directory_killed_between_its_renames_is_found_aside(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    _write_dir(target, "v1")
    # the second Path.rename of the swap (the new directory into place) never happens
    _crash(
        "kill_at(Path, 'rename', 2)",
        f"with atomic_dir({str(target)!r}) as d:\n (d / 'weights').write_text('v2')",
    )
    assert not target.exists()
    found = resolve_dir(target)
    assert found == tmp_path / ".adapter.old" and (found / "weights").read_text() == "v1"
    _write_dir(target, "v3")  # the next write completes the swap and drops the old copy
    assert resolve_dir(target) == target and (target / "weights").read_text() == "v3"
    assert not (tmp_path / ".adapter.old").exists()


def test_directory_killed_while_filled_leaves_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    _write_dir(target, "v1")
    files = " (d / 'a').write_text('v2')\n (d / 'weights').write_text('v2')"
    body = f"with atomic_dir({str(target)!r}) as d:\n{files}"
    _crash("kill_at(Path, 'write_text', 2)", body)
    assert resolve_dir(target) == target and (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
