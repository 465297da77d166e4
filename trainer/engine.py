"""The DeepSpeed boundary: process group, ZeRO config generated from the RunConfig, and initialize.

This is the only module that imports deepspeed. The loop talks to the returned engine through its
methods (forward, backward, step, save_checkpoint), never to deepspeed itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from trainer.config import DistributedConfig, RunConfig
from trainer.device import accelerator_name

log = logging.getLogger(__name__)


DEFAULT_TIMEOUT_S: float = DistributedConfig.model_fields["collective_timeout_s"].default


def init_distributed(
    use_gpu: bool, init_method: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join (or create) the process group: NCCL on GPUs, gloo on CPUs.

    Under Ray Train the group already exists and is reused (Ray's backend set its timeout). ``init_method``
    (e.g. a ``file://`` store) overrides torchrun's ``env://``. A lone process becomes a world of one over
    an in-memory store: no rendezvous file to clean up, no socket. ``timeout_s`` bounds every collective
    (``distributed.collective_timeout_s``): DeepSpeed's and NCCL's default is 10 minutes.
    """
    check_accelerator(use_gpu)
    backend = "nccl" if use_gpu else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "RANK" not in os.environ and init_method is None:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    with _op_build_reported():
        if dist.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
            return
        deepspeed.init_distributed(
            dist_backend=backend,
            init_method=init_method,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timeout,
        )


SHM_OP = "deepspeed_shm_comm"
"""DeepSpeed's CPU communication op: JIT-compiled once into TORCH_EXTENSIONS_DIR, loaded from there after."""


@contextlib.contextmanager
def _op_build_reported() -> Iterator[None]:
    """DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully" every time it merely loads its
    compiled CPU op: the line is dropped, and one is logged only when the op was really compiled."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(SHM_OP, verbose=False))
    existed = any(build_dir.glob("*.so"))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            if "built successfully" not in line:
                print(line)
    if not existed and any(build_dir.glob("*.so")):
        log.info("compiled DeepSpeed's CPU communication op into %s (once: later runs load it)", build_dir)


def check_accelerator(use_gpu: bool) -> None:
    """DeepSpeed chose its accelerator when it was imported: it must be the one this worker trains on
    (trainer.device.select_accelerator sets it before the import)."""
    chosen, wanted = get_accelerator().device_name(), accelerator_name(use_gpu)
    if chosen != wanted:
        raise RuntimeError(
            f"DeepSpeed runs on its {chosen!r} accelerator but this worker trains on {wanted!r}: "
            f"call trainer.device.select_accelerator({use_gpu}) before deepspeed is first imported "
            f"(or set DS_ACCELERATOR={wanted} in this worker's environment)"
        )


# DeepSpeed's default ZeRO bucket (5e8 elements; ZeRO-1/2 keep one, two with overlap_comm) is sized for
# training every weight: preallocated on a GPU, it reserves 1-4 GB for a few million adapter parameters.
DEEPSPEED_DEFAULT_BUCKET = 500_000_000
BUCKET_QUANTUM = 2**20


def zero_bucket_elements(trainable_params: int) -> int:
    """Elements of one ZeRO reduce (and all-gather) bucket for ``trainable_params`` trainable parameters.

    Big enough for the whole step's gradients (one reduction per bucket type and step, nothing split),
    rounded up to a MiB of elements (an even count, as DeepSpeed's all-gather alignment asks), and never
    more than DeepSpeed's default. Memory planners count ``(1 + overlap_comm)`` such buffers per rank in
    the gradient dtype.
    """
    quanta = max(1, -(-trainable_params // BUCKET_QUANTUM))
    return min(DEEPSPEED_DEFAULT_BUCKET, quanta * BUCKET_QUANTUM)


def deepspeed_config(
    cfg: RunConfig, world_size: int, trainable_params: int, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed JSON config, derived from the typed RunConfig (never written by hand).

    ``trainable_params`` sizes the ZeRO buckets (``zero_bucket_elements``). ``load_universal``: the
    checkpoint to resume from was converted to DeepSpeed's universal format (written with another world
    size).
    """
    t, d = cfg.train, cfg.distributed
    bucket = zero_bucket_elements(trainable_params)
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "reduce_bucket_size": bucket,  # ZeRO 1-3: gradients
        "allgather_bucket_size": bucket,  # ZeRO 1-2: updated partitions
    }
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
        "checkpoint": {"load_universal": load_universal},
    }


def partition_module(module: nn.Module, ds_config: dict[str, Any]) -> None:
    """Partition ``module``'s parameters over the data-parallel group now (ZeRO-3), as if it had been
    built inside ``deepspeed.zero.Init``.

    What DeepSpeed supports here (deepspeed/runtime/zero/partition_parameters.py, 0.19.8):
    ``Init(module=m)`` runs ``_convert_to_zero_parameters(m.parameters())``, which skips parameters
    that are already ZeRO parameters (``is_zero_param``: tied weights partitioned with an earlier
    module) and, for each other one, moves it to the local device, broadcasts rank 0's bytes
    (``param.data.view(torch.uint8)``: any dtype, so also bitsandbytes' packed NF4 storage) and keeps
    only this rank's slice (``param.partition()``). The parameter object stays the same, so attributes
    such as a ``Params4bit``'s ``quant_state`` stay attached (verified: a forward of a partitioned
    ``Linear4bit`` inside ``GatheredParameters`` equals the whole layer's). ``deepspeed.initialize``
    then sees a ZeRO-Init model (engine.py ``_configure_distributed_model``: any parameter with a
    ``ds_id``): it neither moves nor broadcasts it, and stage 3 (parameter_offload.py
    ``_convert_to_zero_parameters``) only converts parameters that are not ZeRO parameters yet.

    On the CPU a tensor the loader read in the checkpoint's own dtype is a page of the memory-mapped
    file. The broadcast writes rank 0's bytes into it on every other rank, and the kernel then copies
    each written page privately and keeps the copy until the file is closed, after the whole model
    has loaded: measured, the embedding and head (130 MB) stayed on rank 1 after partitioning freed
    them. A receiving rank therefore takes its own copy first, which partitioning frees.
    """
    if dist.get_rank() != 0:
        for param in module.parameters():
            if not hasattr(param, "ds_id") and param.device.type == "cpu":
                param.data = param.data.clone()
    deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)


def layer_partitioner(cfg: RunConfig, world_size: int) -> Callable[[nn.Module], None] | None:
    """What the streaming loader calls on each layer it loads: ZeRO-3 partitioning, or nothing below
    stage 3 (ZeRO 0-2 keep the frozen base whole on every rank)."""
    if cfg.distributed.zero_stage != 3:
        return None
    # zero.Init reads the stage-3 fields only: the buckets (sized from the trainable count, not known
    # before the adapters are injected) play no part in partitioning.
    config = deepspeed_config(cfg, world_size, trainable_params=0)
    return lambda module: partition_module(module, config)


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: RunConfig,
    load_universal: bool = False,
) -> Any:
    """Wrap model and optimizer in a DeepSpeedEngine (data parallel over the current process group).

    DeepSpeed would move to GPU number LOCAL_RANK; ``device_rank`` keeps it on the model's own device
    (under Ray a worker's GPU need not be its local rank's).
    """
    world_size = dist.get_world_size()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    device = next(model.parameters()).device
    device_rank = device.index if device.type == "cuda" else int(os.environ.get("LOCAL_RANK", 0))
    config = deepspeed_config(cfg, world_size, trainable, load_universal)
    if cfg.distributed.zero_stage == 0 and cfg.train.dtype == "fp32":
        # The only configuration where DeepSpeed hands the client optimizer the raw gradients without
        # checking them first (ZeRO 1-3 and bf16 skip a step whose gradient norm is not finite), and
        # without measuring their norm: the guard does both, and clips (DeepSpeed's clipping there
        # would discard the norm it computes, and clip before the guard could measure).
        optimizer = FiniteStepGuard(optimizer, max_norm=cfg.optim.grad_clip)
        config["gradient_clipping"] = 0.0
    engine, *_ = deepspeed.initialize(
        args=argparse.Namespace(device_rank=device_rank),
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
    )
    return engine


class FiniteStepGuard(torch.optim.Optimizer):
    """Wraps an optimizer so that a step whose gradients are not all finite changes nothing, and measures
    (and clips to ``max_norm``) the global gradient norm before the step, as DeepSpeed's ZeRO optimizers do.

    Used at ZeRO stage 0 in fp32, where every rank holds the same all-reduced gradients, so every rank
    takes the same decision and measures the same norm without communicating. The norm is left in
    ``_global_grad_norm``, where DeepSpeed's engine picks it up for ``get_global_grad_norm``; it is that of
    the gradient the optimizer consumes (preconditioned, when the preconditioner is on), before clipping.
    """

    def __init__(self, inner: torch.optim.Optimizer, max_norm: float | None = None) -> None:
        self.inner = inner
        self.max_norm = max_norm
        self.skipped_last = False
        self._global_grad_norm: float | None = None
        # Share the inner optimizer's groups and state: DeepSpeed and schedulers read and write them here.
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.defaults = inner.defaults

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # float64: the squares of float32 gradients cannot overflow, so the norm is finite exactly when
        # every gradient is (one host read decides both).
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if grads else 0.0
        self._global_grad_norm = norm
        self.skipped_last = not math.isfinite(norm)
        if self.skipped_last:
            self.zero_grad(set_to_none=True)
            return None
        if self.max_norm is not None and norm > self.max_norm:
            torch._foreach_mul_(grads, self.max_norm / (norm + 1e-6))  # DeepSpeed's and torch's coefficient
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def global_grad_norm(engine: Any) -> float | None:
    """The norm of the last step's whole gradient (every rank's, after reduction, before clipping) at any
    ZeRO stage; None where DeepSpeed measured none."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def step_was_skipped(engine: Any) -> bool:
    """Whether the last optimizer step was skipped for a non-finite gradient (by DeepSpeed or the guard)."""
    guard = engine.optimizer if isinstance(engine.optimizer, FiniteStepGuard) else None
    return (guard is not None and guard.skipped_last) or not engine.was_step_applied()


# DeepSpeed pickles a few of its own plain data classes into checkpoints; they are safe to rebuild.
_SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside the block every torch.load is weights-only (DeepSpeed's few data classes allowed).

    DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, which would execute
    whatever a tampered file holds; here such a file fails to load instead.
    """
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


STATE_TAG = "state"
UNIVERSAL_TAG = "state_universal"


def save_state(engine: Any, directory: Path) -> None:
    """This rank's shards of the trainable state (adapters, optimizer, scheduler); the frozen base is
    excluded: it is reloaded from the base model."""
    engine.save_checkpoint(str(directory), tag=STATE_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_state(engine: Any, directory: Path, universal: bool) -> None:
    """Restore what ``save_state`` wrote (from its universal conversion if the world size changed)."""
    tag = UNIVERSAL_TAG if universal else STATE_TAG
    with weights_only_loads():
        path, _ = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"{directory}: DeepSpeed found no checkpoint under tag {tag!r}")


def convert_to_universal(directory: Path) -> None:
    """Write ``directory/state_universal``: the state re-cut for any world size (run on one rank)."""
    from deepspeed.checkpoint import ds_to_universal

    if (directory / UNIVERSAL_TAG).is_dir():
        return
    args = argparse.Namespace(
        input_folder=str(directory / STATE_TAG),
        output_folder=str(directory / UNIVERSAL_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with weights_only_loads():
        ds_to_universal.main(args)


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], zero_stage: int) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for the block (read-only); a no-op below stage 3."""
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield
