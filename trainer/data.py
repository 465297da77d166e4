"""Training data: load local rows, render and tokenise them, and deal out deterministic global batches.

Global batch k is a fixed slice of a permutation that depends only on the seed and the epoch. It is
cut into ``world_size * grad_accum_steps`` micro-batches; rank r takes micro-batch ``j * world_size +
r`` at accumulation step j. So 2 workers x 1 accumulation step see exactly the micro-batches of 1 worker
x 2 steps, and runs compare across worker counts. The loss is a sum over tokens divided by the loss
tokens of the whole global batch, which every rank can count locally: no communication, and the same
gradient however the batch is cut.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from trainer.config import DataConfig, RunConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the row."""


def load_rows(path: str) -> datasets.Dataset:
    """Rows of a local jsonl/json file (never a hub name)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such data file (only local files are read)")
    try:
        return datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:  # datasets wraps parse errors in several types
        raise DataError(f"{path}: cannot be read as json lines: {e}") from e


def _field(row: dict[str, Any], name: str, path: str, index: int) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: row {index + 1}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def encode_row(
    row: dict[str, Any], index: int, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, path: str
) -> dict[str, Any]:
    """input_ids and labels (prompt tokens masked unless ``train_on_prompt``) of one row."""
    if cfg.format == "text":
        prompt_ids: list[int] = tokenizer(_field(row, cfg.text_field, path, index))["input_ids"]
        response_ids: list[int] = []
        train_prompt = True
    else:
        prompt = cfg.prompt_template.format(prompt=_field(row, cfg.prompt_field, path, index))
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_text = _field(row, cfg.response_field, path, index)
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        train_prompt = cfg.train_on_prompt
    input_ids = (prompt_ids + response_ids + [tokenizer.eos_token_id])[: cfg.max_seq_len]
    labels = (
        list(input_ids) if train_prompt else [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    )
    labels = labels[: len(input_ids)]
    # Tokens that carry loss after the one-position shift of next-token prediction.
    n_loss = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "n_loss": n_loss}


def tokenize(path: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> datasets.Dataset:
    rows = load_rows(path)
    encoded = rows.map(
        lambda row, i: encode_row(row, i, tokenizer, cfg, path),
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"tokenising {Path(path).name}",
    )
    return encoded.with_format("python")


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class StepBatch:
    """What one rank trains on in one optimizer step."""

    micro_batches: list[dict[str, torch.Tensor]]
    global_loss_tokens: int  # loss tokens of the whole global batch (all ranks, all micro-batches)
    global_tokens: int  # non-pad input tokens of the whole global batch
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)  # logged with the step (e.g. packing efficiency)


class GlobalBatches:
    """Deterministic global batches; see the module docstring for how they are cut and shared."""

    def __init__(
        self,
        data: datasets.Dataset,
        *,
        micro_batch_size: int,
        grad_accum_steps: int,
        world_size: int,
        rank: int,
        seed: int,
        pad_id: int,
    ) -> None:
        self.data = data
        self.micro = micro_batch_size
        self.accum = grad_accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.pad_id = pad_id
        self.global_size = micro_batch_size * grad_accum_steps * world_size
        if len(data) < self.global_size:
            raise DataError(f"{len(data)} training rows are fewer than one global batch ({self.global_size})")
        self.steps_per_epoch = len(data) // self.global_size
        self._n_loss = list(data["n_loss"])
        self._n_tokens = [len(ids) for ids in data["input_ids"]]
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.data), generator=gen))
        return self._perm[1]

    def global_indices(self, step: int) -> list[int]:
        """Row indices of global batch ``step`` (independent of world size and accumulation)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_size
        return self._permutation(epoch)[start : start + self.global_size].tolist()

    def for_step(self, step: int) -> StepBatch:
        indices = self.global_indices(step)
        micro = []
        for j in range(self.accum):
            chunk = j * self.world_size + self.rank
            rows = indices[chunk * self.micro : (chunk + 1) * self.micro]
            micro.append(collate([self.data[i] for i in rows], self.pad_id))
        return StepBatch(
            micro_batches=micro,
            global_loss_tokens=sum(self._n_loss[i] for i in indices),
            global_tokens=sum(self._n_tokens[i] for i in indices),
            epoch=step // self.steps_per_epoch,
        )


def eval_batches(
    data: datasets.Dataset,
    micro_batch_size: int,
    world_size: int,
    rank: int,
    pad_id: int,
    max_batches: int | None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the eval set (rows rank, rank + W, ...), in micro-batches.

    Every rank gets the same number of micro-batches (ZeRO-3 gathers parameters collectively in each
    forward): a rank that runs out of rows gets a filler batch whose labels carry no loss.
    """
    rows = list(range(rank, len(data), world_size))
    n_batches = math.ceil(math.ceil(len(data) / world_size) / micro_batch_size)  # the same on every rank
    if max_batches:
        n_batches = min(n_batches, max_batches)
    batches = []
    for b in range(n_batches):
        chunk = rows[b * micro_batch_size : (b + 1) * micro_batch_size]
        if chunk:
            batches.append(collate([data[i] for i in chunk], pad_id))
        else:
            filler = collate([data[0]], pad_id)
            filler["labels"].fill_(IGNORE_INDEX)
            batches.append(filler)
    return batches


def build_data(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int, world_size: int
) -> tuple[GlobalBatches, list[dict[str, torch.Tensor]]]:
    """This rank's training batches and its share of the eval set, as the config says."""
    t = cfg.train
    pad_id = tokenizer.pad_token_id
    plan = GlobalBatches(
        tokenize(cfg.data.train_path, tokenizer, cfg.data),
        micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.grad_accum_steps,
        world_size=world_size,
        rank=rank,
        seed=t.seed,
        pad_id=pad_id,
    )
    evals = []
    if cfg.data.eval_path:
        rows = tokenize(cfg.data.eval_path, tokenizer, cfg.data)
        evals = eval_batches(rows, t.micro_batch_size, world_size, rank, pad_id, t.eval_max_batches)
    return plan, evals
