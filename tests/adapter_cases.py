"""Helpers shared by the adapter tests: a tiny base model per dtype, adapted copies, perturbed weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from trainer.adapters import REGISTRY, adapter_parameters, freeze_base, inject_adapters
from trainer.config import AdapterConfig, ModelConfig
from trainer.model import guard_4bit_gradients, load_base_model

METHODS = sorted(REGISTRY)
MERGEABLE = [m for m in METHODS if REGISTRY[m].mergeable]
PEFT_FORMAT = ["bat", "bone", "dora", "lora", "sara"]  # saved in PEFT's own format
IDS = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def load_base(path: Path, quantization: str = "none", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny model as training sees it: guarded against the bitsandbytes CPU trap, in train mode."""
    model = load_base_model(
        ModelConfig(path=str(path), quantization=quantization), dtype, torch.device("cpu")
    )  # type: ignore[arg-type]
    guard_4bit_gradients(model)
    return model


def adapter_config(method: str, **fields: object) -> AdapterConfig:
    """rank 8 on every linear layer unless ``fields`` say otherwise."""
    return AdapterConfig.model_validate({"method": method, **fields})


def adapted(
    base: nn.Module,
    method: str,
    dtype: torch.dtype = torch.float32,
    ranks: dict[str, int] | None = None,
    **fields: object,
) -> nn.Module:
    """A copy of ``base`` with ``method`` adapters (``adapter_config``), base frozen; seeded."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_adapters(model, adapter_config(method, **fields), dtype, ranks)
    freeze_base(model)
    return model


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Move every adapter tensor away from its init (whose zeros hide most bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model):
        p.add_(std * torch.randn(p.shape, generator=gen).to(p.dtype))


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
