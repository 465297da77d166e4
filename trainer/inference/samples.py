"""Answers to a few fixed eval prompts during training, so that a person can read a run learning.

At every evaluation the first ``train.sample_prompts`` tasks of the eval file are answered greedily;
each answer becomes a row (step, prompt, reference, generation, exact) of the run's ``samples`` table:
``samples.jsonl`` in the output directory and a table artefact of its MLflow run, where the UI shows
the answers changing over the run. Their exact match is logged as ``eval/exact_match``.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from trainer.config import DataConfig, DataSource
from trainer.data import DataError
from trainer.data.formats import BadRowError, decode, prompt_and_reference
from trainer.data.sources import load, resolve
from trainer.inference.generate import greedy_batch

log = logging.getLogger(__name__)

TABLE = "samples"
"""The table's name: ``samples.jsonl`` locally, ``samples.json`` in MLflow."""


@dataclass(frozen=True)
class Task:
    prompt: str
    """What the row asks: its instruction (and input), or its conversation's last user turn."""
    ids: list[int]
    """The prompt as the model reads it: the run's template applied, tokenised."""
    reference: str


def read_tasks(
    path: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> Iterator[Task]:
    """The generation tasks (prompt and reference) of ``path``'s rows in the run's format, in file order;
    a row that is not a task is an error naming the file and row."""
    n = 0
    for f in resolve(DataSource(path=path)).files:
        for i, raw in enumerate(load(f)):
            if limit is not None and n >= limit:
                return
            try:
                row = decode(raw)
                if row is None:
                    continue
                ids, reference = prompt_and_reference(row, cfg, tokenizer)
            except BadRowError as e:
                raise DataError(f"{f.path}: row {i + 1}: {e}") from None
            yield Task(_asked(row, cfg), ids, reference)
            n += 1


def _asked(row: dict[str, Any], cfg: DataConfig) -> str:
    """A task row's question as a person wrote it (prompt_and_reference has checked its fields)."""
    if cfg.format == "chat":
        turns = [m["content"] for m in row[cfg.messages_field] if m["role"] == "user"]
        return str(turns[-1]) if turns else ""
    extra = row.get(cfg.input_field)
    return str(row[cfg.prompt_field]) + (f"\n{extra}" if isinstance(extra, str) and extra else "")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact(generation: str, reference: str) -> bool:
    return generation.strip() == reference.strip()


class Sampler:
    """Answers the run's sample tasks with the model as it is at a step."""

    def __init__(
        self, tasks: list[Task], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, synced: bool
    ) -> None:
        self.tasks, self.tokenizer = tasks, tokenizer
        self.max_new_tokens, self.synced = max_new_tokens, synced

    @classmethod
    def for_run(
        cls, data: DataConfig, n: int, max_new_tokens: int, tokenizer: PreTrainedTokenizerBase, synced: bool
    ) -> Sampler | None:
        """The run's sampler; None when sampling is off (n = 0) or the run has no prompts to answer."""
        if n == 0:
            return None
        if not data.eval_path or data.format == "text":
            why = "its rows are text, with no prompts" if data.eval_path else "it has no data.eval_path"
            log.info("train.sample_prompts=%d: no samples for this run (%s)", n, why)
            return None
        return cls(list(read_tasks(data.eval_path, data, tokenizer, n)), tokenizer, max_new_tokens, synced)

    def __call__(self, model: Any, step: int, batch_size: int = 16) -> list[dict[str, Any]]:
        was_training = model.training
        model.eval()
        try:
            answers = []
            for start in range(0, len(self.tasks), batch_size):
                chunk = [t.ids for t in self.tasks[start : start + batch_size]]
                answers += greedy_batch(model, self.tokenizer, chunk, self.max_new_tokens, self.synced)
        finally:
            model.train(was_training)
        rows = []
        for task, ids in zip(self.tasks, answers, strict=True):
            generation = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            rows.append({"step": step, "prompt": task.prompt, "reference": task.reference,
                         "generation": generation, "exact": exact(generation, task.reference)})  # fmt: skip
        return rows


def exact_match(rows: list[dict[str, Any]]) -> float:
    return sum(bool(r["exact"]) for r in rows) / max(1, len(rows))


def read_samples(path: Path) -> dict[int, list[dict[str, Any]]]:
    """A run's samples.jsonl, by step (a torn last line, from a killed writer, is skipped)."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    if not path.is_file():
        return by_step
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step.setdefault(int(row["step"]), []).append(row)
    return by_step


def summarize(path: Path, examples: int = 2) -> dict[str, Any]:
    """The summary's view of the samples: exact match at the first and last step, and a few answers
    from each (the same prompts), for the demo's before and after."""
    by_step = read_samples(path)
    if not by_step:
        return {}
    first, last = min(by_step), max(by_step)
    return {
        "sample_prompts": len(by_step[last]),
        "exact_match_first": exact_match(by_step[first]),
        "exact_match": exact_match(by_step[last]),
        "samples_first": by_step[first][:examples],
        "samples_last": by_step[last][:examples],
    }
