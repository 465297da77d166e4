"""The local backend: this process, or N processes on this machine through torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from trainer import config as config_lib
from trainer.checkpoint_sink import DirectorySink
from trainer.config import RunConfig
from trainer.worker import run_worker


def run_local(cfg: RunConfig) -> dict[str, Any] | None:
    """Run in-process when this is a worker (world of one, or started by torchrun/srun), else spawn."""
    n = cfg.distributed.num_workers
    if n == 1 or "LOCAL_RANK" in os.environ:
        return run_worker(cfg, DirectorySink(cfg), launcher="torchrun" if "LOCAL_RANK" in os.environ else "local")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_lib.to_yaml(cfg))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
        "-m", "launch", "train", f.name,
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True)
    finally:
        Path(f.name).unlink(missing_ok=True)
    return None
