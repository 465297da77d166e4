"""Build the optimizer (scaled AdamW / scaled GD when the preconditioner is on) and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.adapters import adapter_parameters
from trainer.config import OptimConfig
from trainer.optim.riemannian import RiemannianPreconditioner


def build_optimizer(
    model: nn.Module, cfg: OptimConfig
) -> tuple[torch.optim.Optimizer, RiemannianPreconditioner | None]:
    """The base optimizer over the adapter parameters, and the preconditioner attached to the model.

    With the preconditioner on, AdamW becomes scaled AdamW and SGD scaled GD: the optimizer is unchanged
    and consumes gradients that were preconditioned in backward (see trainer.optim.riemannian).
    """
    params = [p for p in adapter_parameters(model) if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable adapter parameters")
    preconditioner = None
    if cfg.preconditioner == "riemannian":
        preconditioner = RiemannianPreconditioner(
            cfg.delta, getattr(torch, cfg.solve_dtype), damping=cfg.damping, delta_min=cfg.delta_min
        )
        if preconditioner.attach(model) == 0:
            raise ValueError("optim.preconditioner: riemannian needs an adapter with (A, B) factor pairs")
    optimizer: torch.optim.Optimizer
    if cfg.name == "adamw":
        fused = params[0].device.type == "cuda"
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
        )
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if preconditioner:
        preconditioner.watch(optimizer)  # the factors change only at its steps: once per accumulated batch
    return optimizer, preconditioner


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear or cosine decay to zero at ``max_steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
