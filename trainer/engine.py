"""The DeepSpeed boundary: process group, ZeRO config generated from the RunConfig, and initialize.

This is the only module that imports deepspeed. The loop talks to the returned engine through its
methods (forward, backward, step, save_checkpoint), never to deepspeed itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import deepspeed
import torch
from torch import nn

from trainer.config import RunConfig

log = logging.getLogger(__name__)


def init_distributed(use_gpu: bool, init_method: str | None = None) -> None:
    """Join (or create) the process group: NCCL on GPUs, gloo on CPUs.

    Under Ray Train the group already exists and is reused. ``init_method`` (e.g. a ``file://`` store)
    overrides torchrun's ``env://``. A lone process becomes a world of one through a private file store,
    so it opens no socket at all.
    """
    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        init_method = init_method or f"file://{tempfile.mkdtemp(prefix='riemann-tune-pg-')}/store"
    deepspeed.init_distributed(
        dist_backend="nccl" if use_gpu else "gloo",
        init_method=init_method,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        auto_mpi_discovery=False,
        verbose=False,
    )


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, derived from the typed RunConfig (never written by hand)."""
    t, d = cfg.train, cfg.distributed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.zero_stage == 3:
        # Adapters are tiny: gather them whole rather than prefetching in buckets.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.dtype == "bf16"},
        # The client optimizer is torch's AdamW/SGD: no JIT-compiled ops needed, on CPU or GPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: RunConfig,
) -> Any:
    """Wrap model and optimizer in a DeepSpeedEngine (data parallel over the current process group)."""
    world_size = torch.distributed.get_world_size()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
    )
    return engine


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], zero_stage: int) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for the block (read-only); a no-op below stage 3."""
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield
