"""Bat: Bone with weight guidance (Kang, arXiv 2409.15371; PEFT's MiSS with init_weights "bat")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo, base_weight
from trainer.adapters.bone import miss_config
from trainer.adapters.layer import Adapter
from trainer.config import AdapterConfig


class Bat(Adapter):
    """Bat: for each r x r block W_ij of W0 (i the output block), Delta W_ij = W_ij D_i + D_i.

    Paper: https://arxiv.org/abs/2409.15371 (MiSS "bat" in PEFT). D is (out / r) x r x r, zero-initialised;
    no scale. The update depends on W0, so the forward dequantises a 4-bit base and adds x Delta W^T to
    the base output (exactly the base output at init, where D = 0). in and out must be divisible by r.
    Merge: W <- W0 + Delta W.
    """

    method = "bat"

    def __init__(self, info: BaseLayerInfo, cfg: AdapterConfig) -> None:
        r = cfg.rank
        if info.in_features % r or info.out_features % r:
            raise ValueError(
                f"bat: adapter.rank {r} must divide the layer's in_features ({info.in_features}) and "
                f"out_features ({info.out_features}): Bat works on whole r x r blocks"
            )
        super().__init__(info, r)
        self.block = nn.Parameter(torch.zeros(info.out_features // r, r, r))

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        delta = self.delta_weight(base_weight(base_layer, self.block.dtype))
        return y + F.linear(x.to(delta.dtype), delta).to(y.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        r, (out_f, in_f) = self.rank, base_weight.shape
        d = self.block.to(base_weight.dtype)
        blocks = base_weight.reshape(out_f // r, r, in_f // r, r).transpose(1, 2)  # [i, j] = W_ij
        delta = blocks @ d[:, None] + d[:, None]
        return delta.transpose(1, 2).reshape(out_f, in_f)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.block}

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        return miss_config(cfg, target_modules, base_model, init_weights="bat")
