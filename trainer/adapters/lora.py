"""LoRA (Hu et al., arXiv 2106.09685), with rsLoRA scaling as an option (Kalajdzievski, arXiv 2312.03732)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo
from trainer.adapters.layer import Adapter
from trainer.config import AdapterConfig


class LoRA(Adapter):
    """y = W0 x + s B A x, with A (r x in), B (out x r), s = alpha / r (rsLoRA: alpha / sqrt(r)).

    A is kaiming-uniform initialised and B is zero, so the layer equals its base at initialisation.
    Merge: W <- W0 + s B A.
    """

    method = "lora"

    def __init__(self, info: BaseLayerInfo, cfg: AdapterConfig, rank: int | None = None) -> None:
        super().__init__(info)
        if info.is_conv:
            raise ValueError("LoRA on convolutions is not supported yet")
        self.rank = rank or cfg.rank
        self.scale = cfg.alpha / (math.sqrt(self.rank) if cfg.rslora else self.rank)
        self.lora_A = nn.Parameter(torch.empty(self.rank, info.in_features))
        self.lora_B = nn.Parameter(torch.zeros(info.out_features, self.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s B A x, with the factors passed through the (optional) gradient transform."""
        a, b = self.pairs(self.lora_A, self.lora_B)
        x = self.dropout(x.to(a.dtype))
        return F.linear(F.linear(x, a), b) * self.scale

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        return y + self.lora_delta(x).to(y.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return [(self.lora_A, self.lora_B)]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @classmethod
    def peft_config(cls, cfg: AdapterConfig, target_modules: list[str], base_model: str) -> dict[str, Any]:
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
            "inference_mode": True,
        }
