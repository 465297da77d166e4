"""Tokenised files for the map-style path, cached on disk, and the bad-row policy.

A file is tokenised once per (tokenizer, encoding settings, file content): the cache key hashes the
tokenizer's full definition and chat template, every config field that changes the tokens, an encoding
version and the file's fingerprint (path, size, mtime). A hit skips reading the raw file at all. The
cache holds every row, bad ones marked, so ``on_bad_row`` can change without re-tokenising. A miss
tokenises with a progress bar, in several processes for large files, and is written atomically under
a file lock (ranks and concurrent runs wait for one writer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.checkpoints import atomic_dir, file_lock
from trainer.config import DataConfig
from trainer.data.formats import make_encoder
from trainer.data.sources import DataError, SourceFile, cache_root, fingerprint, load

log = logging.getLogger(__name__)

ENCODING_VERSION = 2  # bump when formats.py changes the tokens it produces for the same inputs
ENCODING_FIELDS = {
    "format", "prompt_field", "response_field", "text_field", "prompt_template", "train_on_prompt",
    "max_seq_len", "input_field", "input_template", "messages_field", "chat_template", "truncate",
}  # fmt: skip
FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "n_loss": datasets.Value("int32"),
        "length": datasets.Value("int32"),
        "bad": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
    }
)
PARALLEL_ROWS = 20_000  # below this, starting processes costs more than it saves (bench/data_pipeline.py)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = [type(tokenizer).__name__, str(tokenizer.chat_template), str(tokenizer.special_tokens_map)]
    return hashlib.sha256("\n".join([definition, *extra]).encode()).hexdigest()


def cache_key(f: SourceFile, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str:
    settings = cfg.model_dump(mode="json", include=ENCODING_FIELDS)
    parts = [str(ENCODING_VERSION), tokenizer_fingerprint(tokenizer), json.dumps(settings, sort_keys=True)]
    return hashlib.sha256("\n".join([*parts, fingerprint(f)]).encode()).hexdigest()[:32]


def encoded(f: SourceFile, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> datasets.Dataset:
    """Every row of ``f`` encoded (bad rows marked), from the cache or tokenised into it."""
    key = cache_key(f, tokenizer, cfg)
    path = cache_root(cfg.cache_dir) / key
    if not (path / "state.json").is_file():
        with file_lock(path.with_name(f"{key}.lock")):
            if not (path / "state.json").is_file():
                raw = load(f)
                procs = cfg.num_proc or (min(8, os.cpu_count() or 1) if len(raw) >= PARALLEL_ROWS else None)
                out = raw.map(
                    make_encoder(cfg, tokenizer),
                    batched=True,
                    remove_columns=raw.column_names,
                    features=FEATURES,
                    num_proc=procs if procs and procs > 1 else None,
                    new_fingerprint=key,
                    load_from_cache_file=False,  # a miss here means datasets' map cache is stale or cold too
                    desc=f"tokenising {Path(f.path).name}",
                )
                with atomic_dir(path) as tmp:
                    out.save_to_disk(str(tmp))
                log.info("tokenised %s (%d rows) into %s", f.path, len(out), path)
    return datasets.load_from_disk(str(path))


def counts(seen: Counter[str], prefix: str) -> dict[str, float]:
    """Metric names for bad-row counts by kind (``seen`` also holds "truncated": examples cut)."""
    bad = {k: n for k, n in sorted(seen.items()) if k != "truncated"}
    out = {f"{prefix}bad_rows": float(sum(bad.values()))} | {
        f"{prefix}bad_rows_{k}": float(n) for k, n in bad.items()
    }
    return out | {f"{prefix}truncated": float(seen["truncated"])}


def column(data: datasets.Dataset, name: str) -> np.ndarray:
    """One whole column as an array (``data[name]`` in datasets 5 is a lazy column read row by row)."""
    return np.asarray(data.with_format("numpy", columns=[name])[:][name])


@dataclass
class TokenizedFile:
    """The usable rows of a file, how many were skipped per kind of fault, and how many were cut."""

    data: datasets.Dataset
    bad: Counter[str] = field(default_factory=Counter)
    truncated: int = 0


def tokenize_file(f: SourceFile, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> TokenizedFile:
    """``f`` tokenised, with its bad rows raised (naming file and row) or skipped and counted."""
    data = encoded(f, tokenizer, cfg)
    truncated = int(column(data, "truncated").sum())
    empty = np.flatnonzero(column(data, "length") == 0).tolist()
    if not empty:
        return TokenizedFile(data.with_format("python"), truncated=truncated)
    faults = [(i, b) for i, b in zip(empty, column(data.select(empty), "bad"), strict=True) if b]  # "": blank
    if faults and cfg.on_bad_row == "error":
        i, fault = faults[0]
        raise DataError(
            f"{f.path}: row {i + 1}: {fault.split(chr(9), 1)[1]} ({len(faults)} bad rows in this file; "
            "data.on_bad_row=skip drops and counts them)"
        )
    good = np.setdiff1d(np.arange(len(data)), empty).tolist()
    bad = Counter(b.split("\t", 1)[0] for _, b in faults)
    return TokenizedFile(data.select(good).with_format("python"), bad, truncated)
