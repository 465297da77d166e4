"""A trained run, ready to use: its base loaded as the run trained it, the adapter on it.

The base goes through the training's own loader (4-bit NF4 at the run's compute dtype when the run was
quantised, the bitsandbytes CPU guard included), so the model answers as it did in training. The run's
resolved ``config.yaml``, when present, gives the data format and its templates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer import config as config_lib
from trainer.adapters import REGISTRY
from trainer.config import DataConfig
from trainer.errors import InferenceError
from trainer.export import (
    OUR_CONFIG,
    SavedAdapter,
    build_adapted_model,
    load_saved_adapter,
    merge_into_base,
)
from trainer.model import DTYPES, load_tokenizer

log = logging.getLogger(__name__)

# An adapter directory without its run's config.yaml is used with the default instruction format.
DEFAULT_FORMAT = DataConfig.model_validate({"train_path": "<none: used for inference only>"})


@dataclass
class TrainedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: DataConfig
    """The data format (and templates) the run trained on."""
    saved: SavedAdapter
    adapter_dir: Path
    run_dir: Path | None
    """The run directory (config.yaml, summary.json), when the adapter sits in one."""


def find_run(source: Path) -> tuple[Path, Path | None]:
    """(adapter directory, run directory or None) for a run or adapter directory."""
    if (source / OUR_CONFIG).is_file():
        run_dir = source.parent if (source.parent / "config.yaml").is_file() else None
        return source, run_dir
    if (source / "adapter" / OUR_CONFIG).is_file():
        return source / "adapter", source
    if (source / "config.yaml").is_file():
        raise InferenceError(
            f"{source}: this run directory holds no adapter/ yet (the run has not finished, or failed "
            "before writing it); resume it, or point at a run that finished"
        )
    raise InferenceError(f"{source}: neither a run directory nor an adapter directory ({OUR_CONFIG})")


def _base_path(saved: SavedAdapter, adapter_dir: Path, override: str | None) -> str:
    base = override or saved.base_model
    if not (Path(base) / "config.json").is_file():
        where = "--base" if override else f"{adapter_dir / OUR_CONFIG} (base_model)"
        raise InferenceError(
            f"the adapter's base model {base} is not there (recorded in {where}): pass --base PATH "
            "with a local copy of that base"
        )
    return base


def load_trained(
    source: Path, *, base: str | None = None, merged: bool = False, device: torch.device | None = None
) -> TrainedModel:
    """The adapted model of ``source`` (a run or adapter directory), in eval mode; ``merged`` folds the
    adapter into the base first (not for input-dependent methods)."""
    adapter_dir, run_dir = find_run(source)
    saved = load_saved_adapter(adapter_dir)
    if merged and not REGISTRY[saved.cfg.method].mergeable:
        raise InferenceError(
            f"--merged: {saved.cfg.method} cannot be merged (its router mixes experts per token, so no "
            "single weight reproduces it); drop --merged to use the adapter unmerged"
        )
    base_path = _base_path(saved, adapter_dir, base)
    model = build_adapted_model(saved, base_path, device or torch.device("cpu"))
    if merged:
        merge_into_base(model, DTYPES[saved.dtype])
    data = DEFAULT_FORMAT
    if run_dir is not None:
        data = config_lib.load(run_dir / "config.yaml").data
    else:
        log.warning("%s: no run config.yaml beside it; prompts use the default instruction format", source)
    return TrainedModel(model.eval(), load_tokenizer(base_path), data, saved, adapter_dir, run_dir)
