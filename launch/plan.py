"""``python -m launch plan CONFIG [key=value ...] [--gpus 4x24GB] [--cpu-ram 256GB] [--json]``: what a run
needs per GPU and per host, from the architecture's config.json alone (trainer.plan), and what to change
when it does not fit. ``launch train`` runs the same check first (``preflight``) when it finds GPUs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig

ARCHITECTURES = Path(__file__).resolve().parent.parent / "configs" / "architectures"


def add_parser(verbs: Any) -> None:
    plan = verbs.add_parser("plan", help="memory per GPU and per host, before anything is rented")
    plan.add_argument("config", type=Path, help="YAML run config (see configs/)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2")
    plan.add_argument("--gpus", help="COUNTxMEMORY, e.g. 2x24GB, 4x24GB, 8x80GB (default: "
                      "distributed.num_workers x 80GB)")  # fmt: skip
    plan.add_argument("--cpu-ram", help="host RAM per host, e.g. 64GB, 256GB (default: not checked)")
    plan.add_argument("--gpus-per-host", type=int, help="GPUs in one host (default: all of --gpus)")
    plan.add_argument(
        "--architecture",
        help="a directory holding config.json, or a name under configs/architectures/ (e.g. llama-3.1-70b); "
        "default: model.path",
    )
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.max_seq_len)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")


def resolve_architecture(name: str | None) -> str | None:
    """``--architecture``: a directory with config.json, or a configs/architectures/ name."""
    if name is None:
        return None
    for candidate in (Path(name), ARCHITECTURES / name):
        if (candidate / "config.json").is_file():
            return str(candidate)
    known = ", ".join(sorted(p.name for p in ARCHITECTURES.iterdir() if p.is_dir()))
    raise ConfigError(f"--architecture: {name} holds no config.json and is not one of configs/architectures/ "
                      f"({known})")  # fmt: skip


def cmd_plan(args: argparse.Namespace) -> int:
    from trainer.plan import Devices, HardwareError, parse_gpus, parse_size, plan_or_error
    from trainer.plan.report import advice_json, render

    cfg = config_lib.load(args.config, args.overrides)
    try:
        devices = parse_gpus(args.gpus) if args.gpus else Devices(cfg.distributed.num_workers, 80 * 10**9)
        cpu_ram = parse_size(args.cpu_ram) if args.cpu_ram else None
    except HardwareError as e:
        raise ConfigError(str(e)) from None
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len: {args.seq_len} must be at least 2")
    if args.gpus_per_host is not None and args.gpus_per_host < 1:
        raise ConfigError(f"--gpus-per-host: {args.gpus_per_host} must be at least 1")
    architecture = resolve_architecture(args.architecture)
    advice = plan_or_error(cfg, devices, seq_len=args.seq_len, architecture=architecture, cpu_ram=cpu_ram,
                           gpus_per_host=args.gpus_per_host)  # fmt: skip
    if args.json:
        print(json.dumps(advice_json(advice), indent=1))
    else:
        print(render(advice))
    if not advice.plan.fits and (advice.fixed is None or not advice.fixed.fits):
        raise ConfigError(advice.message)  # nothing makes it fit: a usage error (exit 2), saying by how much
    return 0 if advice.plan.fits else 1


def preflight(cfg: RunConfig, devices: Any) -> str | None:
    """Before training on ``devices`` (the GPUs found): None if the plan fits or ``train.force`` is set,
    else raise a ConfigError carrying the plan's table and the suggested change."""
    from trainer.plan import plan_or_error
    from trainer.plan.report import render

    advice = plan_or_error(cfg, devices)
    if advice.plan.fits:
        return None
    text = render(advice)
    if cfg.train.force:
        return f"train.force: true, training although the plan does not fit:\n{text}"
    raise ConfigError(f"the plan does not fit the GPUs found (set train.force: true to try anyway):\n{text}")


def check_devices(cfg: RunConfig) -> str | None:
    """``launch train``'s check: plan against the CUDA devices this host sees; nothing on CPU-only runs
    (the demo) or when the run does not train on GPUs."""
    import torch

    if cfg.distributed.use_gpu is False or not torch.cuda.is_available():
        return None  # trainer.plan (which imports DeepSpeed) only once CUDA is known to be there
    from trainer.plan import Devices, cuda_devices

    found = cuda_devices()
    if found is None:
        return None
    return preflight(cfg, Devices(cfg.distributed.num_workers, found.memory))
