"""What the plan is checked against: the devices (``--gpus 4x24GB``), the host RAM, and the fixed costs
of a process on them that no model component explains.

The fixed costs are constants, each with where it comes from:

- ``CUDA_CONTEXT_BYTES``: the CUDA context and the kernels torch loads into it (lazy module loading,
  CUDA 12): 0.5 GiB per process. nvidia-smi shows 0.4-0.6 GiB for a process that has done one matmul
  on Ampere/Hopper with torch 2.x; torch.cuda.max_memory_allocated never counts it. Not measured in
  this project yet (no GPU was lent): the ``gpu``-marked test compares it.
- ``NCCL_BYTES``: NCCL's communicator buffers, 0.25 GiB per process for the data-parallel group
  (NCCL_BUFFSIZE 4 MiB per channel and peer, up to 32 channels on NVLink, fewer on PCIe).
- ``ALLOCATOR_RESERVE``: torch's caching allocator reserves more than it hands out (block rounding
  and fragmentation): 10% over the allocated peak, the usual gap between max_memory_reserved and
  max_memory_allocated in a training step with variable-size activations.
- ``CPU_PROCESS_BYTES``: on a CPU-only run the host is the device; a worker's anonymous memory after
  start-up (torch, transformers, DeepSpeed imported, the gloo process group up), measured here by
  bench.memory_load and bench.planner_accuracy (peak_start): 0.40 GB per process.
- ``CPU_RUNTIME_BYTES``: what a CPU worker's anonymous memory grows by while it loads and initialises,
  beyond every tensor the plan counts (transformers' modelling code imported, DeepSpeed's engine
  objects, glibc's arenas): 35 MB, measured once on bench.planner_accuracy's first grid point
  (S-z2-n1-mb1-ck0: its peak minus start-up minus the plan's components) and then held fixed for
  every other point; that point's error is therefore not independent evidence.
- ``HOST_PROCESS_BYTES``: a GPU worker's host RAM with CUDA initialised (torch's CUDA libraries,
  the pinned staging pool): 3 GiB per process, the RssAnon of a CUDA torch process after its first
  step (order of magnitude; not measured in this project).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 2**30
GB = 10**9

CUDA_CONTEXT_BYTES = GIB // 2
NCCL_BYTES = GIB // 4
ALLOCATOR_RESERVE = 0.10
CPU_PROCESS_BYTES = 400_000_000
CPU_RUNTIME_BYTES = 35_000_000
HOST_PROCESS_BYTES = 3 * GIB

_UNITS = {"": GB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": GIB, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_GPUS = re.compile(r"^\s*(\d+)\s*[xX*]\s*(.+)$")


class HardwareError(ValueError):
    """A ``--gpus`` or ``--cpu-ram`` spec that does not parse; the message gives the expected form."""


def parse_size(text: str, option: str = "--cpu-ram") -> int:
    """``256GB``, ``24GiB``, ``80`` (GB) -> bytes. GB is 10^9 bytes, GiB 2^30 (as vendors and nvidia-smi)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise HardwareError(
            f"{option}: {text!r} is not a memory size; expected a positive number and a unit, e.g. 24GB, "
            "80GB, 24GiB or 256GB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Devices:
    """``count`` devices of ``memory`` bytes each (kind ``cuda``), or the host itself (kind ``cpu``)."""

    count: int
    memory: int
    kind: str = "cuda"

    def describe(self) -> str:
        return f"{self.count} x {self.memory / GIB:.1f} GiB {'GPU' if self.kind == 'cuda' else 'CPU process'}"


def parse_gpus(text: str) -> Devices:
    """``4x24GB`` -> 4 GPUs of 24 GB; ``1x80GiB``; ``8x40``. Anything else: the expected form."""
    match = _GPUS.match(text)
    if not match or int(match.group(1)) < 1:
        raise HardwareError(
            f"--gpus: {text!r} does not parse; expected COUNTxMEMORY, e.g. 2x24GB, 4x24GB, 8x80GB or 1x24GiB"
        )
    try:
        memory = parse_size(match.group(2), "--gpus")
    except HardwareError as e:
        raise HardwareError(f"{e} (in --gpus {text!r}; expected COUNTxMEMORY, e.g. 4x24GB)") from None
    return Devices(int(match.group(1)), memory)


def cuda_devices() -> Devices | None:
    """The GPUs this process sees (the smallest one's memory), or None without CUDA."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    count = torch.cuda.device_count()
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(count))
    return Devices(count, memory)
