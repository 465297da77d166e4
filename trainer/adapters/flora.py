"""FLoRA: a Tucker core for N-dimensional weights (Si et al., arXiv 2405.14739)."""

from __future__ import annotations

import math
import string
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo, conv_with
from trainer.adapters.layer import Adapter
from trainer.config import AdapterConfig

FORMAT_VERSION = 1


def mode_product(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """G x_1 U_1 x_2 U_2 ... x_n U_n: factor U_i (d_i x r_i) maps mode i of the core from r_i to d_i."""
    modes = string.ascii_lowercase[: core.dim()]
    operands = ",".join(f"{m.upper()}{m}" for m in modes)
    return torch.einsum(f"{modes},{operands}->{modes.upper()}", core, *factors)


class FLoRA(Adapter):
    """FLoRA: Delta W = s * G x_1 U_out x_2 U_in x_3 U_k1 ... (Tucker), s = alpha / r (rsLoRA optional).

    Paper: https://arxiv.org/abs/2405.14739. The weight's modes are (out, in / groups, k1, k2, ...); the
    core G has one rank per mode (out and in: ``adapter.rank``, kernel modes: ``adapter.flora.spatial_rank``
    or the kernel size; each clipped to its mode's size) and each mode a factor U_i (d_i x r_i). For a
    linear layer Delta W = s U_out G U_in^T, applied as three thin matmuls. Convolutions keep their
    spatial modes (no flattening to 2-D): the forward adds a convolution with Delta W and the base
    layer's stride, padding, dilation and groups. G is zero and the factors kaiming-normal (fan = d_i,
    so each column has norm about sqrt(2) whatever the layer's width): Delta W = 0 at init.
    Merge: W <- W0 + Delta W. Saved in our format (docs/adapter-format.md).
    """

    method = "flora"
    supports_conv = True

    def __init__(self, info: BaseLayerInfo, cfg: AdapterConfig) -> None:
        super().__init__(info, cfg.rank)
        dims = (info.out_features, info.in_features // info.groups, *info.kernel_size)
        spatial = [cfg.flora.spatial_rank or k for k in info.kernel_size]
        ranks = [min(r, d) for r, d in zip((cfg.rank, cfg.rank, *spatial), dims, strict=True)]
        self.scale = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
        self.core = nn.Parameter(torch.zeros(ranks))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, r)) for d, r in zip(dims, ranks, strict=True)
        )
        for factor in self.factors:
            nn.init.kaiming_normal_(factor, mode="fan_out")
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        x = self.dropout(x.to(self.core.dtype))
        if self.info.is_conv:
            delta = conv_with(base_layer, x, self._delta(self.core.dtype))
        else:
            u_out, u_in = self.factors
            delta = F.linear(F.linear(x @ u_in, self.core), u_out) * self.scale
        return y + delta.to(y.dtype)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        return mode_product(self.core.to(dtype), [u.to(dtype) for u in self.factors]) * self.scale

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self._delta(torch.float32)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"flora_core": self.core} | {f"flora_factors.{i}": u for i, u in enumerate(self.factors)}

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "peft_type": "FLORA",
            "format": "riemann-tune",
            "format_version": FORMAT_VERSION,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.rank,
            "alpha": cfg.alpha,
            "use_rslora": cfg.rslora,
            "spatial_rank": cfg.flora.spatial_rank,
            "dropout": cfg.dropout,
            "target_modules": target_modules,
            "inference_mode": True,
        }
