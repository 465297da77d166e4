"""Which device a worker trains on, decided in the worker, before DeepSpeed is imported.

DeepSpeed picks its accelerator once, when it is first imported, from ``DS_ACCELERATOR`` or else from
what it detects. That choice belongs to each worker: a launcher on a CPU-only login node or Ray head
must not hand its own "cpu" to GPU workers, and a worker told ``use_gpu: false`` on a GPU host must
not leave DeepSpeed on CUDA under gloo. So every launcher calls ``select_accelerator`` in the worker
process before it imports ``trainer.worker`` (which imports DeepSpeed), and ``DS_ACCELERATOR`` is never
passed from the launcher to its workers. No deepspeed import here.
"""

from __future__ import annotations

import os

import torch

from trainer.config import ConfigError

ACCELERATOR_ENV = "DS_ACCELERATOR"


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """``distributed.use_gpu``, with null meaning: CUDA when this process sees a GPU."""
    return torch.cuda.is_available() if use_gpu is None else use_gpu


def accelerator_name(use_gpu: bool) -> str:
    """DeepSpeed's name for the accelerator of a worker that trains on GPUs or not."""
    return "cuda" if use_gpu else "cpu"


def select_accelerator(use_gpu: bool) -> str:
    """Tell DeepSpeed which accelerator this worker uses; call it before deepspeed is imported.

    Overrides any inherited value: the worker's ``use_gpu`` decides, not its parent's environment.
    ``trainer.engine.init_distributed`` checks that DeepSpeed took this choice.
    """
    name = accelerator_name(use_gpu)
    os.environ[ACCELERATOR_ENV] = name
    return name


def check_gpu_count(workers: int, gpus_per_worker: float, gpus: float, where: str) -> None:
    """Refuse a GPU run that needs more GPUs than ``where`` has, instead of failing on a device ordinal
    that does not exist (local) or waiting forever for resources that never come (Ray)."""
    needed = workers * gpus_per_worker
    if needed > gpus:
        raise ConfigError(
            f"distributed.num_workers={workers} x distributed.gpus_per_worker={gpus_per_worker:g} needs "
            f"{needed:g} GPUs but {where} has {gpus:g}: lower distributed.num_workers to at most "
            f"{int(gpus // gpus_per_worker)}, or train on CPUs with distributed.use_gpu=false"
        )


def local_device(use_gpu: bool, local_rank: int) -> torch.device:
    """The device of a worker that sees every GPU of its machine (our local launcher, torchrun, srun):
    GPU number LOCAL_RANK. Ray gives each worker its own device instead (launch/ray_job.py)."""
    if not use_gpu:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this machine has {count}; start at most {count} "
            "workers per machine (distributed.num_workers, or torchrun's --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)
