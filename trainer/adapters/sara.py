"""SARA: singular-value based adaptive rank (Gu et al., arXiv 2408.03290): a LoRA whose rank each module
chooses from its pretrained weight's spectrum. No official code exists: this is our reading of the paper
(docs/methods.md), not a port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo, base_weight, weight_of
from trainer.adapters.layer import Adapter
from trainer.adapters.lora import LoRA
from trainer.config import AdapterConfig, SaraConfig


def svd_rank(singular_values: torch.Tensor, rule: SaraConfig) -> int:
    """The smallest k whose k largest singular values sum to ``rule.tau`` of the total, clipped to
    [r_min, r_max]. Computed in float64 so the threshold test does not depend on summation order."""
    s = singular_values.double().sort(descending=True).values
    cumulative = s.cumsum(0)
    k = int(torch.searchsorted(cumulative, rule.tau * cumulative[-1]).item()) + 1
    return max(rule.r_min, min(rule.r_max, k))


def from_rank0(
    compute: Callable[[], list[torch.Tensor]], count: int, device: torch.device
) -> list[torch.Tensor]:
    """``compute()``'s ``count`` float32 matrices, computed on rank 0 only and broadcast to every rank.

    An SVD need not give the same bits on two GPUs, drivers or libraries: SARA ranks computed on each
    rank could differ in shape (DeepSpeed then hangs), Mo-SARA's singular vectors silently. Without a
    process group (a merge, a test) it is just ``compute()``. Every rank must call it at the same point
    with the same ``count``: injection visits the modules in the same order everywhere.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    mine = [t.to(device, torch.float32).contiguous() for t in compute()] if dist.get_rank() == 0 else []
    shapes = torch.tensor([n for t in mine for n in t.shape] or [0] * 2 * count, device=device)
    dist.broadcast(shapes, src=0)
    out = mine or [torch.empty(rows, cols, device=device) for rows, cols in shapes.view(count, 2).tolist()]
    for t in out:
        dist.broadcast(t, src=0)
    return out


def base_spectrum(base_layer: nn.Module) -> torch.Tensor:
    """Singular values of the (dequantised) base weight, its kernel modes flattened into the columns."""
    return torch.linalg.svdvals(base_weight(base_layer, torch.float32).flatten(1))


class SARA(LoRA):
    """SARA: a LoRA (y = W0 x + s_k B A x, s_k = alpha / k) with a per-module rank k from the SVD rule.

    Paper: https://arxiv.org/abs/2408.03290. At injection each module's k is the smallest k whose
    leading singular values (of the dequantised base weight) reach a fraction tau of their sum, clipped
    to [r_min, r_max] (``adapter.sara``). The ranks are logged as a table and saved with the adapter
    (``riemann_tune.json`` and PEFT's ``rank_pattern``, so PEFT loads a SARA adapter as a LoRA). A
    loaded adapter takes its ranks from the saved map instead of recomputing them. Init, forward,
    merge and the (A, B) pair are LoRA's.
    """

    method = "sara"
    adaptive_rank = True

    @classmethod
    def from_base(
        cls, base_layer: nn.Module, info: BaseLayerInfo, cfg: AdapterConfig, rank: int | None = None
    ) -> Adapter:
        if rank is None:  # the same on every rank: rank 0's

            def chosen() -> list[torch.Tensor]:
                return [torch.tensor([[svd_rank(base_spectrum(base_layer), cfg.sara)]], dtype=torch.float32)]

            (k,) = from_rank0(chosen, 1, weight_of(base_layer).device)
            rank = int(k.item())
        return cls(info, cfg, rank)

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        values = sorted(ranks.values())
        default = max(set(values), key=values.count) if values else cfg.rank
        return {
            **super().peft_config(cfg, target_modules, base_model, ranks),
            "r": default,
            "rank_pattern": {name: k for name, k in ranks.items() if k != default},
        }
