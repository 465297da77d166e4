"""Checkpoints on a (shared) filesystem: ``<output.dir>/checkpoints/step_<N>``, keeping the last K.

Every rank writes its DeepSpeed shards into one staging directory; rank 0 then renames it into place,
so a checkpoint directory either exists whole or not at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from trainer.config import RunConfig


class DirectorySink:
    def __init__(self, cfg: RunConfig) -> None:
        self.root = Path(cfg.output.dir) / "checkpoints"
        self.keep_last = cfg.checkpoint.keep_last

    def staging_dir(self, step: int) -> Path:
        return self.root / f".staging-step_{step:08d}"

    def commit(self, step: int, staged: Path, metrics: dict[str, float]) -> None:
        dist.barrier()  # every rank's shards are on disk
        if dist.get_rank() == 0:
            final = self.root / f"step_{step:08d}"
            shutil.rmtree(final, ignore_errors=True)
            staged.rename(final)
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def checkpoints(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return sorted(p for p in self.root.glob("step_*") if p.is_dir())
