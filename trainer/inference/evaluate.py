"""Evaluation of a trained run on a file in the run's format: token loss and perplexity computed exactly
as the training loop's evaluation computes them, and, with generation, exact and normalised-text match."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.data import IGNORE_INDEX, eval_batches
from trainer.data.build import tokenize_path
from trainer.inference.generate import GenerationSettings, generate_ids
from trainer.inference.samples import exact, normalize, read_tasks
from trainer.inference.trained import TrainedModel
from trainer.loop import forward_logits, token_loss_sum

METRICS = ("loss", "exact_match", "normalized_match")


@dataclass
class EvalReport:
    path: str
    examples: int
    tokens: int
    loss: float
    perplexity: float
    exact_match: float | None = None
    normalized_match: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    """Every generated answer beside its prompt and reference (with the match metrics)."""

    def metrics(self) -> dict[str, float]:
        values = {k: v for k, v in asdict(self).items() if isinstance(v, (int, float))}
        return {k: float(v) for k, v in values.items() if v is not None}


@torch.no_grad()
def token_loss(trained: TrainedModel, path: str, micro_batch_size: int) -> tuple[float, int, int]:
    """(mean token loss, loss tokens, examples) over ``path``: the training loop's evaluation on one rank."""
    data_cfg = trained.data.model_copy(update={"on_bad_row": "error"})
    data, _ = tokenize_path(path, data_cfg, trained.tokenizer)
    batches = eval_batches(data, micro_batch_size, 1, 0, trained.tokenizer.pad_token_id, None)
    device = next(trained.model.parameters()).device
    loss, tokens = 0.0, 0
    for micro in tqdm(batches, desc="loss", leave=False):
        micro = {k: v.to(device) for k, v in micro.items()}
        loss += token_loss_sum(forward_logits(trained.model, micro), micro["labels"]).item()
        tokens += int((micro["labels"][:, 1:] != IGNORE_INDEX).sum())
    return loss / max(1, tokens), tokens, len(data)


def match(trained: TrainedModel, path: str, settings: GenerationSettings) -> list[dict[str, str]]:
    """Greedy answers to every row's prompt, beside the references."""
    tasks = list(read_tasks(path, trained.data, trained.tokenizer))
    samples = []
    for task in tqdm(tasks, desc="generate", leave=False):
        answer = trained.tokenizer.decode(generate_ids(trained, task.ids, settings), skip_special_tokens=True)
        samples.append({"prompt": task.prompt, "reference": task.reference, "generation": str(answer)})
    return samples


def evaluate_file(
    trained: TrainedModel,
    path: str,
    metrics: tuple[str, ...] = ("loss",),
    micro_batch_size: int = 8,
    settings: GenerationSettings | None = None,
) -> EvalReport:
    """``metrics`` (see METRICS; loss and perplexity always) of the trained model over ``path``."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"--metrics: unknown {', '.join(unknown)} (choose from {', '.join(METRICS)})")
    loss, tokens, examples = token_loss(trained, path, micro_batch_size)
    report = EvalReport(path, examples, tokens, loss, math.exp(min(loss, 700.0)))
    if {"exact_match", "normalized_match"} & set(metrics):
        report.samples = match(trained, path, settings or GenerationSettings())
        n = max(1, len(report.samples))
        report.exact_match = sum(exact(s["generation"], s["reference"]) for s in report.samples) / n
        report.normalized_match = (
            sum(normalize(s["generation"]) == normalize(s["reference"]) for s in report.samples) / n
        )
    return report


def report_table(report: EvalReport) -> list[tuple[str, Any]]:
    """The rows the CLI prints."""
    rows: list[tuple[str, Any]] = [
        ("file", report.path), ("examples", report.examples), ("loss tokens", report.tokens),
        ("loss", f"{report.loss:.4f}"), ("perplexity", f"{report.perplexity:.3f}"),
    ]  # fmt: skip
    for name in ("exact_match", "normalized_match"):
        value = getattr(report, name)
        if value is not None:
            rows.append((name.replace("_", " "), f"{value:.1%}"))
    return rows
