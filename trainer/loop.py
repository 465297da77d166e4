"""The training loop: steps, evaluation, metrics, checkpoints, bad numbers. No ray or mlflow imports.

The engine is a DeepSpeedEngine (forward/backward/step/eval/train); the tracker a
``trainer.tracking.Tracker``; checkpointing a callback the worker provides.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trainer.data import IGNORE_INDEX, GlobalBatches, StepBatch
from trainer.engine import gathered, global_grad_norm, step_was_skipped
from trainer.loss import loss_sum, token_loss_sum
from trainer.progress import progress
from trainer.tracking import Tracker

__all__ = [
    "LoopSettings",
    "LoopState",
    "forward_logits",
    "micro_loss",
    "timed_step",
    "token_loss_sum",
    "train",
    "train_step",
]


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def forward_logits(engine: Any, micro: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a micro-batch: every key but ``labels`` is a model input (ids, mask, positions, ...).

    No KV cache: training never reuses one, and with one transformers ignores packed position ids
    when it builds the attention mask (packed examples would attend across their boundaries).
    """
    inputs = {k: v for k, v in micro.items() if k != "labels"}
    return engine(**inputs, use_cache=False).logits


def micro_loss(engine: Any, micro: dict[str, torch.Tensor], chunk: int = 0) -> torch.Tensor:
    """A micro-batch's summed token loss; over ``chunk`` tokens at a time if > 0 (trainer.loss)."""
    inputs = {k: v for k, v in micro.items() if k != "labels"}
    stage = engine.zero_optimization_stage()
    return loss_sum(engine, inputs, micro["labels"], chunk, lambda params: gathered(params, stage))


def to_device(micro: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch on ``device``. On CUDA from pinned memory without blocking: a copy from pageable
    memory returns only once it is done, which waits for every kernel queued before it (a device sync
    per micro-batch); from pinned memory it is queued behind them and the host runs on."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in micro.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in micro.items()}


def train_step(
    engine: Any, batch: StepBatch, world_size: int, poison: bool = False, chunk: int = 0
) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss (a float64
    scalar on the engine's device: summed there, so the host waits for the device once per step, not at
    every micro-batch).

    DeepSpeed divides each backward by the accumulation steps and averages over ranks; scaling by both
    and dividing by the global loss-token count makes the gradient a mean over every token of the global
    batch, however it is cut into ranks and micro-batches. ``poison`` makes the loss infinite (drills).
    """
    scale = world_size * len(batch.micro_batches) / max(1, batch.global_loss_tokens)
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for micro in batch.micro_batches:
        micro = to_device(micro, engine.device)
        summed = micro_loss(engine, micro, chunk)
        if poison:
            summed = summed * math.inf
        engine.backward(summed * scale)
        engine.step()
        total += summed.detach()
    return total


def timed_step(
    engine: Any, plan: GlobalBatches, step: int, world_size: int, settings: LoopSettings
) -> tuple[StepBatch, float, float, bool]:
    """Step ``step + 1``: its batch, its mean token loss over the global batch, its seconds (batch
    assembly included) and whether the optimizer skipped it. What ``train`` and bench.peers time."""
    start = time.perf_counter()
    batch = plan.for_step(step)
    poison = step + 1 in settings.poison_steps
    summed = train_step(engine, batch, world_size, poison, settings.loss_chunk_tokens)
    dist.all_reduce(summed)
    loss = summed.item() / max(1, batch.global_loss_tokens)  # the step's one wait for the device
    seconds = time.perf_counter() - start
    return batch, loss, seconds, step_was_skipped(engine) or not math.isfinite(loss)


@torch.no_grad()
def evaluate(engine: Any, batches: list[dict[str, torch.Tensor]], chunk: int = 0) -> float:
    """Mean token loss over the whole eval set (all ranks); summed on the device, read once."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss, tokens
    for micro in batches:
        micro = to_device(micro, engine.device)
        sums[0] += micro_loss(engine, micro, chunk)
        sums[1] += (micro["labels"][:, 1:] != IGNORE_INDEX).sum()
    engine.train()
    dist.all_reduce(sums)
    total_loss, total_tokens = sums.tolist()
    return total_loss / max(1.0, total_tokens)


@dataclasses.dataclass
class LoopState:
    """What the loop has done so far; checkpointed, so a resumed run's summary covers the whole run."""

    step: int = 0
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    eval_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    bad_in_a_row: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoopState:
        return cls(**{**raw, "eval_losses": [(int(s), float(v)) for s, v in raw["eval_losses"]]})

    def record(self, loss: float, skipped: bool, max_bad: int) -> None:
        """Count a finished step; raise once ``max_bad`` steps in a row were skipped as non-finite."""
        self.step += 1
        if skipped:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= max_bad:
                raise NonFiniteTrainingError(
                    f"{self.bad_in_a_row} optimizer steps in a row (the last at step {self.step}) had a "
                    "non-finite loss or gradient and were skipped; stopping. The last good checkpoint is "
                    "kept: lower the learning rate or check the data, then resume with resume=auto."
                )
            return
        self.bad_in_a_row = 0
        self.train_loss_first = loss if self.train_loss_first is None else self.train_loss_first
        self.train_loss_last = loss


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    max_steps: int
    eval_every: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    max_bad_steps: int = 3
    poison_steps: frozenset[int] = frozenset()
    loss_chunk_tokens: int = 0


def train(
    engine: Any,
    plan: GlobalBatches,
    eval_data: list[dict[str, torch.Tensor]],
    settings: LoopSettings,
    tracker: Tracker,
    state: LoopState,
    checkpoint: Callable[[LoopState, dict[str, float]], None] | None = None,
    extra_metrics: Callable[[], dict[str, float]] = dict,
    on_eval: Callable[[int, float], dict[str, float]] = lambda step, loss: {},
) -> LoopState:
    """Train to ``settings.max_steps``. ``on_eval(step, eval_loss)``, called on every rank after each
    evaluation, returns more eval metrics (the sample answers' exact match); it may hold collectives, and
    a launcher's hook rides on it (e.g. reporting to a sweep's scheduler)."""
    world, end = dist.get_world_size(), settings.max_steps
    if eval_data and not state.eval_losses:
        state.eval_losses.append((state.step, evaluate(engine, eval_data, settings.loss_chunk_tokens)))
        extra = on_eval(*state.eval_losses[-1])
        tracker.log_metrics({"eval/loss": state.eval_losses[-1][1]} | extra, step=state.step)
    bar = progress(end, state.step, enabled=dist.get_rank() == 0)  # a log gets a line per 30 s, not a bar
    while state.step < end:
        batch, loss, seconds, skipped = timed_step(engine, plan, state.step, world, settings)
        state.record(loss, skipped, settings.max_bad_steps)
        state.tokens, state.train_seconds = state.tokens + batch.global_tokens, state.train_seconds + seconds
        grad_norm = None if skipped else global_grad_norm(engine)
        metrics = {
            **({} if skipped else {"train/loss": loss}),
            **({} if grad_norm is None else {"train/grad_norm": grad_norm}),
            "train/lr": engine.get_lr()[0],
            "train/tokens_per_s": batch.global_tokens / seconds,
            "train/step_time_s": seconds,
            "train/epoch": batch.epoch,
            "train/skipped_steps": state.skipped_steps,
            **batch.metrics,
        }
        if eval_data and (
            state.step == end or (settings.eval_every and state.step % settings.eval_every == 0)
        ):
            state.eval_losses.append((state.step, evaluate(engine, eval_data, settings.loss_chunk_tokens)))
            metrics["eval/loss"] = state.eval_losses[-1][1]
            metrics |= on_eval(*state.eval_losses[-1])
        if state.step % settings.log_every == 0 or "eval/loss" in metrics or skipped:
            # On every rank (the tracker is null on ranks > 0): extra_metrics may gather over ranks.
            tracker.log_metrics(metrics | extra_metrics(), step=state.step)
        every = settings.checkpoint_every
        if checkpoint and every and (state.step % every == 0 or state.step == end) and not state.bad_in_a_row:
            checkpoint(state, metrics)
        bar.step(state.step, loss, metrics["train/tokens_per_s"])
    bar.close()
    return state
