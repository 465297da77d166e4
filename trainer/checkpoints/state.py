"""Training-state checkpoints: what one holds, how it is sealed, verified, found and resumed from.

A checkpoint directory holds
    state/                   DeepSpeed's shards of the trainable state (adapters, optimizer, LR schedule;
                             the frozen base is excluded: it is reloaded from the base model)
    rng-rank<r>.safetensors  each rank's RNG states
    trainer_state.json       step, loop totals, config fingerprint, MLflow run id, restarts, manifests
    manifest*.json           every file's size and sha256 (one manifest per writer)
It is usable only if every manifest named in trainer_state.json is present and every file it lists
has the recorded size (and hash). Resuming skips unusable checkpoints with a warning and takes the
newest usable one. Nothing here unpickles: JSON, safetensors, and DeepSpeed's files through
``trainer.engine.weights_only_loads``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoints.atomic import atomic_write_text
from trainer.config import RunConfig

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run this config cannot continue; the message names the fields."""


@dataclasses.dataclass
class TrainerState:
    """Everything besides DeepSpeed's shards that a resumed run needs (trainer_state.json)."""

    step: int
    world_size: int
    zero_stage: int
    fingerprint: dict[str, Any]
    manifests: list[str]
    loop: dict[str, Any]
    mlflow_run_id: str | None = None
    restarts: int = 0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # the data position (streams)

    def write(self, directory: Path) -> None:
        atomic_write_text(directory / STATE_FILE, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> TrainerState:
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def fingerprint(cfg: RunConfig, adapted_modules: list[str]) -> dict[str, Any]:
    """What a checkpoint's trainable state depends on: the adapter and where it sits in the base."""
    adapter = {f"adapter.{k}": v for k, v in cfg.adapter.model_dump(mode="json").items() if k != "dropout"}
    return {
        **adapter,
        "adapter.modules": adapted_modules,
        "model.quantization": cfg.model.quantization,
        "train.dtype": cfg.train.dtype,
    }


def check_compatible(saved: TrainerState, current: dict[str, Any], source: Path) -> None:
    """Refuse a checkpoint whose fingerprint differs from this run's, naming each differing field."""
    diffs = []
    for key in sorted(set(saved.fingerprint) | set(current)):
        old, new = saved.fingerprint.get(key), current.get(key)
        if old != new:
            if key == "adapter.modules":
                old, new = f"{len(old or [])} modules", f"{len(new or [])} modules"
            diffs.append(f"{key}: the checkpoint has {old!r}, this config has {new!r}")
    if diffs:
        raise CheckpointMismatchError(f"{source} was written by a different run:\n  " + "\n  ".join(diffs))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, name: str, hashes: bool = True) -> None:
    """Record the size (and sha256) of every file under ``directory`` not already in a manifest."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("manifest"))
    entries = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p) if hashes else None}
        for p in files
    }
    atomic_write_text(directory / name, json.dumps(entries, indent=1) + "\n")


def problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be resumed from, or None if it is whole."""
    try:
        state = TrainerState.read(directory)
    except (OSError, ValueError, TypeError) as e:
        return f"{STATE_FILE} is missing or unreadable ({e})"
    for name in state.manifests:
        try:
            entries = json.loads((directory / name).read_text())
        except (OSError, ValueError) as e:
            return f"{name} is missing or unreadable ({e})"
        for rel, want in entries.items():
            path = directory / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != want["size"]:
                return f"{rel} has {path.stat().st_size} bytes, the manifest says {want['size']}"
            if want["sha256"] and _sha256(path) != want["sha256"]:
                return f"{rel} does not match its sha256"
    return None


def find_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` (any depth: Ray nests them), oldest step first."""

    def step(path: Path) -> int:
        try:
            return int(json.loads((path / STATE_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError):
            return -1

    return sorted((p.parent for p in root.rglob(STATE_FILE)), key=step)


def latest_usable(root: Path) -> Path | None:
    """The newest whole checkpoint under ``root``; broken ones are skipped with a warning."""
    for directory in reversed(find_checkpoints(root)):
        why = problem(directory)
        if why is None:
            return directory
        log.warning("skipping checkpoint %s: %s; trying the one before it", directory, why)
    return None


def resolve(cfg: RunConfig, checkpoint_root: Path) -> Path | None:
    """The checkpoint ``cfg.resume`` asks for: None, ``auto`` (newest usable, or a fresh start) or a path."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = latest_usable(checkpoint_root)
        log.info(
            "resume=auto: %s", f"continuing from {found}" if found else "no checkpoint yet, starting fresh"
        )
        return found
    path = Path(cfg.resume)
    why = problem(path) if path.is_dir() else "no such directory"
    if why:
        raise FileNotFoundError(f"resume: {path} cannot be resumed from: {why}")
    return path


def save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rng-rank{rank}.safetensors"))


def restore_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    path = directory / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True


def record_attempt(cfg: RunConfig, job_id: str | None) -> int:
    """Which attempt of launch ``job_id`` this is (rank 0 only): Ray restarts a failed launch's workers,
    and each attempt is counted under <output.dir>/.jobs so the run can say how often it restarted."""
    if job_id is None:
        return 1
    path = Path(cfg.output.dir) / ".jobs" / f"{job_id}.json"
    attempts = json.loads(path.read_text())["attempts"] + 1 if path.is_file() else 1
    atomic_write_text(path, json.dumps({"attempts": attempts}) + "\n")
    return int(attempts)
