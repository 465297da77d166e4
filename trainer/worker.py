"""One worker of a run: from the process group to the run's outputs. No Ray, no SLURM inside.

The launcher (launch/) calls ``run_worker`` in every worker process, under Ray Train or torchrun, and
passes a ``CheckpointSink`` that persists checkpoints where its backend wants them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import config as config_lib
from trainer.adapters import adapter_layers
from trainer.checkpoints import (
    CheckpointSink,
    TrainerState,
    atomic_write_text,
    check_compatible,
    fingerprint,
    record_attempt,
    resolve,
    restore_rng,
    save_rng,
)
from trainer.config import RunConfig
from trainer.data import build_data
from trainer.device import local_device, resolve_use_gpu
from trainer.engine import (
    build_engine,
    convert_to_universal,
    gathered,
    init_distributed,
    layer_partitioner,
    load_state,
    save_state,
)
from trainer.export import adapter_state_dict, save_adapter
from trainer.inference.samples import TABLE, Sampler, exact_match, summarize
from trainer.loop import LoopSettings, LoopState, train
from trainer.loss import chunk_tokens_for
from trainer.model import BaseDigest, count_parameters, load_tokenizer, prepare_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.tracking import Tracker, log_outputs, memory_metrics, start_tracking

log = logging.getLogger("trainer")


def setup_logging(rank: int) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # weights load in a second; N bars are noise
    # DeepSpeed's CPU path still calls this torch API; nothing a user can act on.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning
    )
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
    job_id: str | None = None,
    resume_from: Path | None = None,
    device: torch.device | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in this worker; rank 0 writes the outputs. Returns the run summary.

    ``resume_from`` (a checkpoint directory) wins over ``cfg.resume``; Ray passes it when it restarts
    the workers after a failure. ``job_id`` names one launch, so that restarts within it keep one
    MLflow run even before the first checkpoint exists. ``device``: the launcher's device for this
    worker (Ray's); else GPU number LOCAL_RANK, or the CPU. ``on_eval(step, eval_loss)``: called on every
    rank after each evaluation (a sweep's scheduler reads it).
    """
    wall_start = time.perf_counter()
    use_gpu = resolve_use_gpu(cfg.distributed.use_gpu)
    if device is None:
        device = local_device(use_gpu, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL: its communicator binds to the current device
    init_distributed(use_gpu, init_method, cfg.distributed.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    resume_dir = resume_from or resolve(cfg, cfg.checkpoint_root)
    saved = TrainerState.read(resume_dir) if resume_dir else None

    tokenizer = load_tokenizer(cfg.model.path)
    digest = BaseDigest() if rank == 0 else None  # fed each layer while whole, before ZeRO-3 partitions
    model = prepare_model(cfg, device, layer_partitioner(cfg, world), digest)
    base_digest = digest.hexdigest() if digest is not None else None
    run_fingerprint = fingerprint(cfg, [name for name, _ in adapter_layers(model)])
    if saved:
        check_compatible(saved, run_fingerprint, resume_dir)  # type: ignore[arg-type]
    optimizer, preconditioner = build_optimizer(model, cfg.optim)
    universal = saved is not None and saved.world_size != world and saved.zero_stage > 0
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    engine = build_engine(model, optimizer, scheduler, cfg, load_universal=universal)
    state = _restore(engine, resume_dir, saved, universal) if saved and resume_dir else LoopState()
    trainable, total = count_parameters(model)
    log.info("world size %d on %s; trainable %d of %d parameters", world, device, trainable, total)

    with rank_zero_first():  # rank 0 fills the tokenisation cache, the others read it
        plan, evals = build_data(cfg, tokenizer, rank=rank, world_size=world)
    attempt = record_attempt(cfg, job_id) if rank == 0 else 1
    run_id = saved.mlflow_run_id if saved else None
    tracker = start_tracking(
        cfg, rank=rank, world_size=world, launcher=launcher, run_id=run_id, job_key=job_id,
        resumed_at=state.step if saved else None,
    )  # fmt: skip
    if saved and saved.data:
        plan.load_state_dict(saved.data)  # a stream continues where it was, without replaying
    # data set sizes and bad rows skipped: facts of the run (tags), not single-point charts that the
    # MLflow UI would sort first, above the losses
    tracker.set_tags({name: f"{value:g}" for name, value in plan.stats().items()})
    if attempt > 1:  # a Ray restart of this launch (rank 0 counts; other ranks' trackers are null)
        tracker.set_tags({"restarts": str(attempt - 1)})
        tracker.log_metrics({"system/restarts": attempt - 1}, step=state.step)

    def checkpoint(loop: LoopState, metrics: dict[str, float]) -> None:
        if sink is None:
            return
        staged = sink.staging_dir(loop.step)
        save_state(engine, staged)
        save_rng(staged, rank)
        record = TrainerState(
            step=loop.step, world_size=world, zero_stage=cfg.distributed.zero_stage,
            fingerprint=run_fingerprint, manifests=[], loop=loop.to_dict(),
            mlflow_run_id=tracker.run_id, restarts=attempt - 1, data=plan.state_dict(),
        )  # fmt: skip
        sink.seal(staged, record, metrics)

    t = cfg.train
    settings = LoopSettings(
        max_steps=t.max_steps, eval_every=t.eval_every_n_steps, log_every=t.log_every_n_steps,
        checkpoint_every=cfg.checkpoint.every_n_steps, max_bad_steps=t.max_bad_steps,
        poison_steps=frozenset(t.inject_nonfinite_steps),
        loss_chunk_tokens=chunk_tokens_for(t.loss_chunk_tokens, model.config),
    )  # fmt: skip

    def extra_metrics() -> dict[str, float]:
        """Every rank calls it at the same steps: it may hold a collective."""
        fallbacks = float(preconditioner.fallbacks) if preconditioner else None
        counted = {} if fallbacks is None else {"train/preconditioner_fallbacks": fallbacks}
        return counted | memory_metrics(device)

    sample = _sampling(cfg, tokenizer, engine, tracker)

    def after_eval(step: int, eval_loss: float) -> dict[str, float]:
        metrics = sample(step)
        if on_eval is not None:
            on_eval(step, eval_loss)
        return metrics

    try:
        state = train(engine, plan, evals, settings, tracker, state, checkpoint, extra_metrics, after_eval)
    except BaseException:
        tracker.finish("FAILED")
        raise
    summary = _summary(state, tracker, trainable, total, world, time.perf_counter() - wall_start)
    if preconditioner:
        summary["preconditioner_fallbacks"] = preconditioner.fallbacks
    summary["data"] = plan.stats()
    summary |= summarize(Path(cfg.output.dir) / f"{TABLE}.jsonl")
    _write_outputs(cfg, model, tracker, summary, base_digest)
    return summary


def _sampling(
    cfg: RunConfig, tokenizer: Any, engine: Any, tracker: Tracker
) -> Callable[[int], dict[str, float]]:
    """The loop's eval hook: answers to the run's sample prompts, logged as the ``samples`` table.

    Rank 0 answers alone, unless ZeRO-3 partitions the parameters: then every rank generates the same
    answers in step, since each forward gathers the parameters collectively.
    """
    stage3 = cfg.distributed.zero_stage == 3 and dist.get_world_size() > 1
    t = cfg.train
    sampler = Sampler.for_run(cfg.data, t.sample_prompts, t.sample_max_new_tokens, tokenizer, stage3)
    if sampler is None or not (stage3 or dist.get_rank() == 0):
        return lambda step: {}

    def sample(step: int) -> dict[str, float]:
        rows = sampler(engine.module, step)
        tracker.log_table(rows, TABLE)  # a null tracker on ranks > 0
        return {"eval/exact_match": exact_match(rows)}

    return sample


def _restore(engine: Any, directory: Path, saved: TrainerState, universal: bool) -> LoopState:
    """Load the trainable state, RNG and loop totals of a checkpoint into a freshly built engine."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if universal:
        log.warning(
            "resuming %s, written by %d workers, with %d: adapter and optimizer state are re-partitioned "
            "through DeepSpeed's universal checkpoint format; RNG streams restart from the seed",
            directory, saved.world_size, world,
        )  # fmt: skip
        if rank == 0:
            convert_to_universal(directory)
        dist.barrier()
    load_state(engine, directory, universal)
    if universal or not restore_rng(directory, rank):
        torch.manual_seed(saved.step * 1_000_003 + rank)
    log.info("resumed from %s at step %d", directory, saved.step)
    return LoopState.from_dict(saved.loop)


def _summary(
    state: LoopState, tracker: Tracker, trainable: int, total: int, world: int, wall_s: float
) -> dict[str, Any]:
    return {
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_loss_first": state.train_loss_first,
        "train_loss_last": state.train_loss_last,
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


def _write_outputs(
    cfg: RunConfig, model: torch.nn.Module, tracker: Tracker, summary: dict[str, Any], base_digest: str | None
) -> None:
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
        quantization=cfg.model.quantization, dtype=cfg.train.dtype, base_digest=base_digest,
        quantized_on=next(model.parameters()).device.type,
    )  # fmt: skip
    atomic_write_text(out / "config.yaml", config_lib.to_yaml(cfg))
    summary.update(tracker.flush())  # queued metrics delivered (or counted as dropped) first
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log_outputs(tracker, cfg.tracking, out)
    log.info("wrote %s (adapter/, config.yaml, summary.json)", out)
