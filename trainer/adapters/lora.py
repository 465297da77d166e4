"""LoRA (Hu et al., arXiv 2106.09685), with rsLoRA scaling as an option (Kalajdzievski, arXiv 2312.03732)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo, conv_with
from trainer.adapters.layer import Adapter
from trainer.config import AdapterConfig


class LoRA(Adapter):
    """LoRA: y = W0 x + s B A x, with A (r x in), B (out x r), s = alpha / r (rsLoRA: alpha / sqrt(r)).

    Paper: https://arxiv.org/abs/2106.09685 (rsLoRA: https://arxiv.org/abs/2312.03732).
    A is kaiming-uniform initialised and B is zero, so the layer equals its base at initialisation.
    Merge: W <- W0 + s B A.

    Convolutions keep PEFT's shapes, A (r, in / groups, *kernel) and B (out, r, 1, ...): Delta W =
    s (B A) reshaped to the kernel, applied as a second convolution with the base's stride, padding,
    dilation and groups (exact for grouped convolutions, which PEFT itself cannot merge; PEFT loads our
    conv adapters only for groups = 1).
    """

    method = "lora"
    supports_conv = True

    def __init__(self, info: BaseLayerInfo, cfg: AdapterConfig, rank: int | None = None) -> None:
        super().__init__(info, rank or cfg.rank)
        r = self.rank
        self.scale = cfg.alpha / (math.sqrt(r) if cfg.rslora else r)
        ones = (1,) * len(info.kernel_size)
        self.lora_A = nn.Parameter(torch.empty(r, info.in_features // info.groups, *info.kernel_size))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, r, *ones))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as matrices (r x fan-in, out x r)."""
        return self.lora_A.flatten(1), self.lora_B.flatten(1)

    def lora_delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """s B A x for a linear layer, the conv with s B A for a convolution."""
        a, b = self.factors()
        x = self.dropout(x.to(a.dtype))
        if self.info.is_conv:
            return conv_with(base_layer, x, (b @ a).view(self._weight_shape()) * self.scale)
        return F.linear(F.linear(x, a), b) * self.scale

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        return y + self.lora_delta(x, base_layer).to(y.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.flatten(1).float(), self.lora_B.flatten(1).float()
        return (b @ a).view(self._weight_shape()) * self.scale

    def _weight_shape(self) -> tuple[int, ...]:
        i = self.info
        return (i.out_features, i.in_features // i.groups, *i.kernel_size)

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return [(self.lora_A, self.lora_B)]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "use_rslora": cfg.rslora,
            "lora_dropout": cfg.dropout,
            "target_modules": target_modules,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        }
