"""The training loop: steps, evaluation, metrics and checkpoints. No ray, mlflow or deepspeed imports.

The engine is anything with DeepSpeedEngine's forward/backward/step/eval/train; the tracker is a
``trainer.tracking.Tracker``; checkpointing is a callback the worker provides.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.data import IGNORE_INDEX, GlobalBatches, StepBatch
from trainer.tracking import Tracker


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the tokens that carry loss (in float32)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def forward_logits(engine: Any, micro: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a micro-batch: every key but ``labels`` is a model input (ids, mask, positions, ...)."""
    return engine(**{k: v for k, v in micro.items() if k != "labels"}).logits


def train_step(engine: Any, batch: StepBatch, world_size: int) -> float:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss.

    DeepSpeed divides each backward by the accumulation steps and averages over ranks; scaling by both
    and dividing by the global loss-token count makes the gradient a mean over every token of the global
    batch, however it is cut into ranks and micro-batches.
    """
    scale = world_size * len(batch.micro_batches) / max(1, batch.global_loss_tokens)
    total = 0.0
    for micro in batch.micro_batches:
        micro = {k: v.to(engine.device) for k, v in micro.items()}
        loss_sum = token_loss_sum(forward_logits(engine, micro), micro["labels"])
        engine.backward(loss_sum * scale)
        engine.step()
        total += loss_sum.item()
    return total


@torch.no_grad()
def evaluate(engine: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean token loss over the whole eval set (all ranks)."""
    engine.eval()
    loss, tokens = 0.0, 0
    for micro in batches:
        micro = {k: v.to(engine.device) for k, v in micro.items()}
        loss += token_loss_sum(forward_logits(engine, micro), micro["labels"]).item()
        tokens += int((micro["labels"][:, 1:] != IGNORE_INDEX).sum())
    engine.train()
    total_loss, total_tokens = _all_reduce([loss, tokens], engine.device)
    return total_loss / max(1.0, total_tokens)


@dataclass
class LoopState:
    """What the loop measured; the run summary is built from it."""

    step: int = 0
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0


def train(
    engine: Any,
    plan: GlobalBatches,
    eval_data: list[dict[str, torch.Tensor]],
    *,
    max_steps: int,
    eval_every: int,
    log_every: int,
    tracker: Tracker,
    checkpoint: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_every: int = 0,
    extra_metrics: Callable[[], dict[str, float]] = dict,
    state: LoopState | None = None,
) -> LoopState:
    state = state or LoopState()
    world = dist.get_world_size()
    if eval_data and not state.eval_losses:
        state.eval_losses.append((state.step, evaluate(engine, eval_data)))
        tracker.log_metrics({"eval_loss": state.eval_losses[-1][1]}, step=state.step)
    bar = tqdm(
        total=max_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=dist.get_rank() != 0,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # logs (SLURM, Ray) get a line every 30 s
    )
    while state.step < max_steps:
        start = time.perf_counter()
        batch = plan.for_step(state.step)
        (loss_sum,) = _all_reduce([train_step(engine, batch, world)], engine.device)
        seconds = time.perf_counter() - start
        state.step += 1
        state.train_losses.append(loss_sum / max(1, batch.global_loss_tokens))
        state.tokens += batch.global_tokens
        state.train_seconds += seconds
        metrics = {
            "loss": state.train_losses[-1],
            "lr": engine.get_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": batch.global_tokens / seconds,
            "step_time_s": seconds,
            "epoch": batch.epoch,
            **batch.metrics,
        }
        if eval_data and (state.step == max_steps or (eval_every and state.step % eval_every == 0)):
            state.eval_losses.append((state.step, evaluate(engine, eval_data)))
            metrics["eval_loss"] = state.eval_losses[-1][1]
        if state.step % log_every == 0 or "eval_loss" in metrics:
            # On every rank (the tracker is null on ranks > 0): extra_metrics may gather over ranks.
            tracker.log_metrics(metrics | extra_metrics(), step=state.step)
        if (
            checkpoint
            and checkpoint_every
            and (state.step % checkpoint_every == 0 or state.step == max_steps)
        ):
            checkpoint(state.step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        bar.update()
    bar.close()
    return state
