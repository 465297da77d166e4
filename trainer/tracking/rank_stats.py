"""Per-rank measurements gathered to rank 0 for logging: one small collective per logged step."""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far, in MiB.

    On a GPU: the most memory torch's allocator has handed out on ``device`` (what the model needs; the
    allocator's cache comes on top: ``peak_reserved_mb``). On a CPU: the process's peak resident set
    size, which includes the interpreter and libraries (~0.3-0.5 GiB for torch alone).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def gather_to_rank0(value: float, device: torch.device) -> list[float]:
    """Every rank's ``value``, in rank order (on every rank): one all-reduce of a world-sized vector.

    Each rank writes its value into its own slot of a zero vector, so the sum is the gather; an
    all-reduce of a few floats costs about one latency, like the step's loss reduction. Every rank must
    call it at the same point.
    """
    t = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    t[dist.get_rank()] = value
    dist.all_reduce(t)
    return t.tolist()


def peak_reserved_mb(device: torch.device) -> float:
    """On a GPU: the most memory torch's caching allocator has held on ``device`` (allocated plus its
    cache and fragmentation), in MiB. This, not the allocated peak, is what runs out first."""
    return torch.cuda.max_memory_reserved(device) / 2**20


def memory_metrics(device: torch.device) -> dict[str, float]:
    """``system/memory_peak_mb`` (the largest over ranks) and ``system/memory_peak_mb.rank<i>`` for every
    rank; on GPUs also ``system/memory_peak_reserved_mb`` and ``.rank<i>`` (the allocator's reserve).
    Under ``system/``, MLflow draws them in its System metrics tab, beside the node's own."""
    metrics = _over_ranks("system/memory_peak_mb", peak_memory_mb(device), device)
    if device.type == "cuda":
        metrics |= _over_ranks("system/memory_peak_reserved_mb", peak_reserved_mb(device), device)
    return metrics


def _over_ranks(name: str, value: float, device: torch.device) -> dict[str, float]:
    per_rank = gather_to_rank0(value, device)
    return {name: max(per_rank)} | {f"{name}.rank{i}": v for i, v in enumerate(per_rank)}
