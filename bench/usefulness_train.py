"""One LoRA fine-tuning run of the usefulness benchmark: a plain single-process torch loop.

Every run starts from the same base, the same adapter initialisation (seeded) and sees the same batches
in the same order; only the optimizer, its preconditioner and the learning rate change. No gradient
clipping, no weight decay, constant learning rate without warm-up: the damping's effect on the first
steps (B = 0 at init) is part of what is measured. Runs execute in worker processes of one thread each
(see ``init_worker``), so their losses do not depend on which worker ran them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LlamaForCausalLM

from trainer.adapters import adapter_layers, freeze_base, inject_adapters
from trainer.config import AdapterConfig, OptimConfig
from trainer.optim import build_optimizer

ADAPTER = AdapterConfig(rank=8, alpha=16.0, target_modules="all-linear")


@dataclass(frozen=True)
class Variant:
    """An optimizer setting swept over learning rates."""

    name: str
    optimizer: str  # adamw | sgd
    preconditioner: str = "none"  # none | riemannian (ours) | peft (PEFT's create_riemannian_optimizer)
    damping: str = "absolute"
    delta: float = 1e-2
    delta_min: float = 1e-8  # floor of the relative damping
    solve_dtype: str = "float32"


@dataclass(frozen=True)
class Protocol:
    """What every run shares."""

    steps: int = 300
    batch: int = 4
    block: int = 64
    eval_every: int = 25
    seed: int = 0


_WORKER: dict[str, Any] = {}


def init_worker(base_dir: str, train: torch.Tensor, held: torch.Tensor) -> None:
    """Load the base once per worker process; one thread, so two workers share two cores evenly."""
    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    _WORKER.update(base=model.train(), train=train, eval=held)


def adapted_model(seed: int) -> LlamaForCausalLM:
    """A fresh copy of the base with LoRA r=8 on every linear layer, A initialised from ``seed``."""
    model = copy.deepcopy(_WORKER["base"])
    torch.manual_seed(seed)
    inject_adapters(model, ADAPTER)
    freeze_base(model)
    return model


@torch.no_grad()
def eval_loss(model: torch.nn.Module) -> float:
    held = _WORKER["eval"]
    return float(model(input_ids=held, labels=held).loss)


def _optimizer(model: LlamaForCausalLM, variant: Variant, lr: float) -> tuple[Any, Any, torch.nn.Module]:
    """(optimizer, our preconditioner or None, the module to train)."""
    if variant.preconditioner == "peft":
        return _peft(model, variant, lr)
    cfg = OptimConfig(
        name=variant.optimizer,
        lr=lr,
        preconditioner="riemannian" if variant.preconditioner == "riemannian" else "none",
        damping=variant.damping,
        delta=variant.delta,
        delta_min=variant.delta_min,
        solve_dtype=variant.solve_dtype,
        grad_clip=None,
    )
    optimizer, pre = build_optimizer(model, cfg)
    return optimizer, pre, model


def _peft(model: LlamaForCausalLM, variant: Variant, lr: float) -> tuple[Any, None, torch.nn.Module]:
    """PEFT's LoRA on a copy of the base, factors copied from ``model``, PEFT's Riemannian optimizer."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_riemannian_optimizer

    ours = {name: layer.adapter for name, layer in adapter_layers(model)}
    peft_model = get_peft_model(
        copy.deepcopy(_WORKER["base"]),
        LoraConfig(
            r=ADAPTER.rank, lora_alpha=int(ADAPTER.alpha), target_modules="all-linear", lora_dropout=0.0
        ),
    )
    with torch.no_grad():
        for peft_name, module in peft_model.named_modules():
            name = peft_name.removeprefix("base_model.model.")
            if name in ours and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(ours.pop(name).lora_A)
                module.lora_B["default"].weight.zero_()
    assert not ours, f"PEFT adapted other modules than ours: {sorted(ours)} left"
    base_cls = torch.optim.AdamW if variant.optimizer == "adamw" else torch.optim.SGD
    optimizer = create_riemannian_optimizer(peft_model, base_cls, lr=lr, reg=variant.delta, weight_decay=0.0)
    return optimizer, None, peft_model


@torch.no_grad()
def factor_norms(model: torch.nn.Module) -> dict[str, float]:
    """Mean Frobenius norms of the A and B factors over the adapted layers (how far each has moved)."""
    a = [p.norm() for n, p in model.named_parameters() if "lora_A" in n]
    b = [p.norm() for n, p in model.named_parameters() if "lora_B" in n]
    return {"A": float(torch.stack(a).mean()), "B": float(torch.stack(b).mean())}


def fine_tune(task: tuple[Variant, float, Protocol]) -> dict[str, Any]:
    """Train one (variant, lr); the eval-loss curve every ``eval_every`` steps and the train losses."""
    variant, lr, proto = task
    start = time.perf_counter()
    optimizer, pre, model = _optimizer(adapted_model(proto.seed), variant, lr)
    init = factor_norms(model)
    train = _WORKER["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(proto.seed))
    curve, losses = [(0, eval_loss(model))], []
    for step in range(1, proto.steps + 1):
        rows = order[torch.arange((step - 1) * proto.batch, step * proto.batch) % len(order)]
        loss = model(input_ids=train[rows], labels=train[rows]).loss
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break  # diverged: the rest of the curve would be NaN
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % proto.eval_every == 0 or step == proto.steps:
            curve.append((step, eval_loss(model)))
    final = curve[-1][1] if curve[-1][0] == proto.steps else math.inf
    return {
        **asdict(variant),
        "variant": variant.name,
        "lr": lr,
        "final_eval_loss": final,
        "eval_curve": curve,
        "train_loss": [round(x, 5) for x in losses],
        "fallbacks": pre.fallbacks if pre is not None else 0,
        "factors_init": init,
        "factors_final": factor_norms(model),
        "seconds": time.perf_counter() - start,
    }
