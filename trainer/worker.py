"""One worker of a run: from the process group to the run's outputs. No Ray, no SLURM inside.

The launcher (launch/) calls ``run_worker`` in every worker process, under Ray Train or torchrun, and
passes a ``CheckpointSink`` that persists checkpoints where its backend wants them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from trainer import config as config_lib
from trainer.artifacts import atomic_write_text
from trainer.checkpoint import adapter_state_dict, save_adapter
from trainer.config import RunConfig
from trainer.data import build_data
from trainer.engine import build_engine, gathered, init_distributed
from trainer.loop import LoopState, train
from trainer.model import count_parameters, load_tokenizer, prepare_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.tracking import Tracker, log_outputs, start_tracking

log = logging.getLogger("trainer")


class CheckpointSink(Protocol):
    """Where a launcher keeps checkpoints: ``staging_dir`` is written by every rank, then ``commit``."""

    def staging_dir(self, step: int) -> Path: ...
    def commit(self, step: int, staged: Path, metrics: dict[str, float]) -> None: ...


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "httpx", "alembic", "mlflow", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the others after it."""
    if dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.get_rank() == 0:
        dist.barrier()


def run_worker(
    cfg: RunConfig,
    sink: CheckpointSink | None = None,
    launcher: str = "local",
    init_method: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in this worker; rank 0 writes the outputs and returns the summary."""
    wall_start = time.perf_counter()
    use_gpu = cfg.distributed.use_gpu if cfg.distributed.use_gpu is not None else torch.cuda.is_available()
    init_distributed(use_gpu, init_method)
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)

    tokenizer = load_tokenizer(cfg.model.path)
    model = prepare_model(cfg, device)
    optimizer, preconditioner = build_optimizer(model, cfg.optim)
    engine = build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.max_steps), cfg)
    trainable, total = count_parameters(model)
    log.info("world size %d on %s; trainable %d of %d parameters", world, device, trainable, total)

    with rank_zero_first():  # rank 0 fills the tokenisation cache, the others read it
        plan, evals = build_data(cfg, tokenizer, rank=rank, world_size=world)
    tracker = start_tracking(cfg, rank=rank, world_size=world, launcher=launcher)
    t = cfg.train

    def extra_metrics() -> dict[str, float]:
        return {"preconditioner_fallbacks": float(preconditioner.fallbacks)} if preconditioner else {}

    def checkpoint(step: int, metrics: dict[str, float]) -> None:
        if sink is None:
            return
        staged = sink.staging_dir(step)
        engine.save_checkpoint(str(staged), tag="state", client_state={"step": step})
        sink.commit(step, staged, metrics)

    try:
        state = train(
            engine, plan, evals,
            max_steps=t.max_steps, eval_every=t.eval_every_n_steps, log_every=t.log_every_n_steps,
            tracker=tracker, checkpoint=checkpoint, checkpoint_every=cfg.checkpoint.every_n_steps,
            extra_metrics=extra_metrics,
        )  # fmt: skip
    except BaseException:
        tracker.finish("FAILED")
        raise
    summary = _summary(state, tracker, trainable, total, world, time.perf_counter() - wall_start)
    if preconditioner:
        summary["preconditioner_fallbacks"] = preconditioner.fallbacks
    _write_outputs(cfg, model, tracker, summary)
    return summary


def _summary(
    state: LoopState, tracker: Tracker, trainable: int, total: int, world: int, wall_s: float
) -> dict[str, Any]:
    return {
        "steps": state.step,
        "train_loss_first": state.train_losses[0],
        "train_loss_last": state.train_losses[-1],
        "eval_loss_first": state.eval_losses[0][1] if state.eval_losses else None,
        "eval_loss": state.eval_losses[-1][1] if state.eval_losses else None,
        "tokens_per_s": state.tokens / state.train_seconds,
        "wall_s": wall_s,
        "world_size": world,
        "trainable_params": trainable,
        "total_params": total,
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.uri,
    }


def _write_outputs(cfg: RunConfig, model: torch.nn.Module, tracker: Tracker, summary: dict[str, Any]) -> None:
    """adapter/ (PEFT format), config.yaml and summary.json, all atomic; rank 0 writes, all gather."""
    import json

    params = [p for p in model.parameters() if p.requires_grad]
    with gathered(params, cfg.distributed.zero_stage):
        state = adapter_state_dict(model) if dist.get_rank() == 0 else {}
    if dist.get_rank() != 0:
        return
    out = Path(cfg.output.dir)
    save_adapter(
        state, model, cfg.adapter, cfg.model.path, out / "adapter",
        quantization=cfg.model.quantization, dtype=cfg.train.dtype,
    )  # fmt: skip
    atomic_write_text(out / "config.yaml", config_lib.to_yaml(cfg))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log_outputs(tracker, out)
    log.info("wrote %s (adapter/, config.yaml, summary.json)", out)
