"""Checkpoints on a (shared) filesystem: ``<output.dir>/checkpoints/step_<N>``, keeping the last K.

Every rank writes its shards into one staging directory; rank 0 then writes trainer_state.json and one
manifest over every file, and renames the directory into place: a checkpoint either exists whole or
not at all (a crash mid-write leaves only a staging directory, which resume never reads).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from trainer.checkpoints.state import TrainerState, find_checkpoints, write_manifest
from trainer.config import RunConfig


class CheckpointSink(Protocol):
    """Where a launcher keeps checkpoints: every rank writes into ``staging_dir``, then ``seal``."""

    def staging_dir(self, step: int) -> Path: ...
    def seal(self, staged: Path, state: TrainerState, metrics: dict[str, float]) -> None: ...


class DirectorySink:
    def __init__(self, cfg: RunConfig) -> None:
        self.root = cfg.checkpoint_root
        self.keep_last = cfg.checkpoint.keep_last
        self.hashes = cfg.checkpoint.verify_hashes

    def staging_dir(self, step: int) -> Path:
        return self.root / f".staging-step_{step:08d}"

    def seal(self, staged: Path, state: TrainerState, metrics: dict[str, float]) -> None:
        dist.barrier()  # every rank's shards are on disk
        if dist.get_rank() == 0:
            state.manifests = ["manifest.json"]
            state.write(staged)
            write_manifest(staged, "manifest.json", self.hashes)
            final = self.root / f"step_{state.step:08d}"
            shutil.rmtree(final, ignore_errors=True)
            staged.rename(final)
            for old in find_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
