"""The training step waits for the device once per optimizer step, not once per micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_train_step_reads_nothing_back_per_micro_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """4 micro-batches per step: the loss is summed on the device and read once, after the step
    (``train``'s one ``item``), so ``train_step`` itself reads nothing back (before: one ``item`` per
    micro-batch, each a device sync on CUDA). Counted in tests/zero_harness.py around train_step."""
    cmd = [sys.executable, "-m", "tests.zero_harness", "--model", str(tiny_model_dir), "--out", str(tmp_path),
           "--world", "1", "--accum", "4", "--steps", "2",
           "--configs", json.dumps([{"name": "s2", "stage": 2}])]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert json.loads((tmp_path / "s2.json").read_text())["loop_host_reads"] == [0, 0]
