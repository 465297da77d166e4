"""build_data: the one entry point the worker calls (config in, this rank's batches out)."""

from __future__ import annotations

import logging
from collections import Counter

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from trainer.config import DataConfig, DataSource, RunConfig
from trainer.data.batches import GlobalBatches, Layout, MapBatches, eval_batches
from trainer.data.formats import make_encoder
from trainer.data.order import generator
from trainer.data.sources import DataError, resolve
from trainer.data.streaming import StreamBatches
from trainer.data.tokenized import counts, tokenize_file

log = logging.getLogger(__name__)


def hold_out(ids: list[int], fraction: float, seed: int, source: int) -> tuple[list[int], list[int]]:
    """(train, eval) ids of one source: a seeded ``fraction`` held out, both kept in source order."""
    if not fraction:
        return ids, []
    n_eval = max(1, round(fraction * len(ids)))
    if n_eval >= len(ids):
        raise DataError(f"data.eval_fraction={fraction} leaves no training rows in a source of {len(ids)}")
    perm = torch.randperm(len(ids), generator=generator(seed, 0, source, "eval")).tolist()
    held = set(perm[:n_eval])
    return [x for i, x in enumerate(ids) if i not in held], [x for i, x in enumerate(ids) if i in held]


def tokenize_sources(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[datasets.Dataset, list[list[int]], list[int], Counter[str]]:
    """Every training source tokenised into one data set: its rows, each source's training ids, the
    held-out ids and the counts (bad rows skipped by kind, and "truncated" examples)."""
    parts: list[datasets.Dataset] = []
    sources: list[list[int]] = []
    held: list[int] = []
    bad: Counter[str] = Counter()
    for k, spec in enumerate(cfg.train_path):
        files = [tokenize_file(f, tokenizer, cfg) for f in resolve(spec).files]
        start = sum(len(p) for p in parts)
        n = sum(len(t.data) for t in files)
        if n == 0:
            raise DataError(f"{spec.path}: no usable rows")
        train, evals = hold_out(list(range(start, start + n)), cfg.eval_fraction, cfg.eval_seed, k)
        parts += [t.data for t in files]
        sources.append(train)
        held += evals
        for t in files:
            bad += t.bad + Counter(truncated=t.truncated)
    return datasets.concatenate_datasets(parts).with_format("python"), sources, held, bad


def tokenize_path(
    path: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[datasets.Dataset, Counter[str]]:
    """One path or glob tokenised (evaluation data) and its skipped bad rows."""
    files = [tokenize_file(f, tokenizer, cfg) for f in resolve(DataSource(path=path)).files]
    bad: Counter[str] = Counter()
    for t in files:
        bad += t.bad + Counter(truncated=t.truncated)
    return datasets.concatenate_datasets([t.data for t in files]).with_format("python"), bad


def build_data(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int, world_size: int
) -> tuple[GlobalBatches, list[dict[str, torch.Tensor]]]:
    """This rank's training batches and its share of the eval set, as the config says."""
    d, t = cfg.data, cfg.train
    flat = d.packing and cfg.model.attn_implementation == "flash_attention_2"
    layout = Layout(
        t.micro_batch_size, t.grad_accum_steps, world_size, rank, tokenizer.pad_token_id, d.packing, flat
    )
    capacity = d.max_seq_len if d.packing else None
    info: dict[str, float] = {}
    eval_data = None
    if d.eval_path:
        eval_data, eval_bad = tokenize_path(d.eval_path, d, tokenizer)
        info |= counts(eval_bad, "data/eval_")
    plan: GlobalBatches
    if d.streaming:
        plan = StreamBatches(
            [resolve(s) for s in d.train_path], make_encoder(d, tokenizer), layout,
            seed=t.seed, window=d.shuffle_buffer or 1, capacity=capacity, skip_bad=d.on_bad_row == "skip",
        )  # fmt: skip
    else:
        data, ids, held, bad = tokenize_sources(d, tokenizer)
        eval_data = data.select(held) if held else eval_data
        info |= {"data/train_examples": float(sum(len(s) for s in ids))} | counts(bad, "data/")
        plan = MapBatches(
            data, ids, [s.weight for s in d.train_path], layout,
            seed=t.seed, window=d.shuffle_buffer, capacity=capacity,
        )  # fmt: skip
    evals = []
    if eval_data is not None:
        info["data/eval_examples"] = float(len(eval_data))
        evals = eval_batches(
            eval_data, t.micro_batch_size, world_size, rank, layout.pad_id, t.eval_max_batches
        )
    plan.info = info
    log.info("data: %s", ", ".join(f"{k}={v:g}" for k, v in plan.stats().items()))
    return plan, evals
