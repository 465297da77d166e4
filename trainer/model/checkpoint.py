"""Read a safetensors checkpoint one tensor at a time: a single ``model.safetensors`` or a sharded one
(``model.safetensors.index.json`` naming each tensor's shard), as real models ship.

Shards are opened memory-mapped (``safe_open``): what a read costs in anonymous memory is the tensor
read, and the file-backed pages of the mapping are the kernel's to drop and are shared by every
process on the host that reads the same file.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the tensor."""


def _weight_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> the shard file holding it."""
    index, single = directory / INDEX, directory / SINGLE
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map): {e}") from None
        shards = {shard: directory / shard for shard in set(names.values())}
        missing = sorted(shard for shard, path in shards.items() if not path.is_file())
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {directory}: {missing}")
        return {name: shards[shard] for name, shard in names.items()}
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise CheckpointError(
        f"{directory}: no {SINGLE} and no {INDEX} (the loader reads safetensors checkpoints only; "
        f"found {present})"
    )


class CheckpointReader:
    """Tensors by name, read on request from whichever shard holds them (use as a context manager)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files = _weight_map(self.directory)
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def shape(self, name: str) -> torch.Size:
        """The stored shape, without reading the data."""
        return torch.Size(self._handle(self.files[name]).get_slice(name).get_shape())

    def _checked(self, name: str, expected: torch.Size) -> Path:
        path = self.files.get(name)
        if path is None:
            raise CheckpointError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        stored = self.shape(name)
        if stored != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(stored)}, the model expects {list(expected)}"
            )
        return path

    def read(self, name: str, expected: torch.Size) -> torch.Tensor:
        """The tensor ``name`` (on the CPU), checked against the shape the model expects."""
        tensor: torch.Tensor = self._handle(self._checked(name, expected)).get_tensor(name)
        return tensor

    def read_rows(self, name: str, expected: torch.Size, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the tensor ``name`` (a copy on the CPU); only those are read."""
        rows: torch.Tensor = self._handle(self._checked(name, expected)).get_slice(name)[start:stop]
        return rows
