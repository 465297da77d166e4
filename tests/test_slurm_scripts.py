"""The sbatch scripts, statically: bash parses them, shellcheck finds nothing, and each documents its
options at the top and requeues itself on the signal it asks Slurm for."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
SHELLCHECK = shutil.which("shellcheck")
# The other shell scripts: the GPU check and its wheels, the system packages, the sbatch helpers.
SHELL_SCRIPTS = sorted(
    [*(ROOT / "slurm").glob("*.sh"), *(ROOT / "bench").glob("*.sh"), *(ROOT / "scripts").glob("*.sh")]
)


def test_the_three_launch_paths_exist() -> None:
    assert {p.name for p in SCRIPTS} == {"ray-gpu.sbatch", "ray-cpu.sbatch", "multinode-deepspeed.sbatch"}


@pytest.mark.parametrize("script", [*SCRIPTS, *SHELL_SCRIPTS], ids=lambda p: p.name)
def test_bash_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(
    SHELLCHECK is None, reason="shellcheck is not installed (scripts/system-deps.sh installs it)"
)
def test_shellcheck_is_clean() -> None:
    proc = subprocess.run(
        [SHELLCHECK, "-x", *map(str, SCRIPTS), *map(str, SHELL_SCRIPTS)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_usage_options_and_requeue_at_the_top(script: Path) -> None:
    text = script.read_text()
    header = text.split("set -euo pipefail", 1)[0]
    assert f"sbatch slurm/{script.name} CONFIG" in header, "the exact command, first"
    assert "#SBATCH --requeue" in header and re.search(r"#SBATCH --signal=B:USR1@\d+", header)
    assert "Options:" in header and "Tokens" in header
    assert "resume=auto" in text + (ROOT / "slurm" / "ray-cluster.sh").read_text()
    assert "_run_requeueable" in text + (ROOT / "slurm" / "ray-cluster.sh").read_text()


def test_a_requeued_slurm_job_keeps_its_launch_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same job (and output) gives the same id, so its next start counts as a restart of the launch."""
    from launch.env import launch_id

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch_id("/runs/a") != launch_id("/runs/a"), "outside Slurm every launch is new"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = launch_id("/runs/a")
    assert first == launch_id("/runs/a") and len(first) == 32
    assert launch_id("/runs/b") != first, "two runs in one job stay apart"
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert launch_id("/runs/a") != first
