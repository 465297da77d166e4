"""DoRA: weight-decomposed low-rank adaptation (Liu et al., arXiv 2402.09353)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo, base_bias, base_weight
from trainer.adapters.layer import Adapter
from trainer.adapters.lora import LoRA
from trainer.config import AdapterConfig


class DoRA(LoRA):
    """DoRA: W' = m * V / ||V||_row with V = W0 + s B A (norm per output row), m trainable (length out).

    Paper: https://arxiv.org/abs/2402.09353. A LoRA (same A, B, s, init) plus the magnitude m, initialised
    to ||W0||_row so that m / ||V|| = 1 exactly at init (the norm is cast to m's dtype before dividing,
    so this holds in bf16 too). Forward, with the norm detached (treated as a constant in backward, as
    the paper suggests, which saves V's graph):

        y = W0 x + (m / ||V|| - 1) * (W0 x) + (m / ||V||) * s B A x + bias       (bias not rescaled)

    W0 x is the base output minus its bias; a 4-bit base is dequantised to compute the norm. Dropout, if
    any, acts on the s B A x path only. Merge: W <- (m / ||V||)[:, None] * V. Saved as PEFT's LoRA with
    ``use_dora`` (the magnitude is ``lora_magnitude_vector``).
    """

    method = "dora"
    supports_conv = False

    def __init__(self, info: BaseLayerInfo, cfg: AdapterConfig, magnitude: torch.Tensor) -> None:
        super().__init__(info, cfg)
        self.magnitude = nn.Parameter(magnitude.detach().clone())

    @classmethod
    def from_base(
        cls, base_layer: nn.Module, info: BaseLayerInfo, cfg: AdapterConfig, rank: int | None = None
    ) -> Adapter:
        return cls(info, cfg, base_weight(base_layer, torch.float32).norm(dim=1))

    def _ratio(self, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """m / ||W0 + s B A||_row, the norm detached and computed in float32."""
        with torch.no_grad():
            norm = (w0 + self.scale * (b.float() @ a.float())).norm(dim=1)
        return self.magnitude / norm.to(self.magnitude.dtype)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        a, b = self.factors()
        ratio = self._ratio(base_weight(base_layer, torch.float32), a, b)
        bias = base_bias(base_layer)
        w0x = y - bias if bias is not None else y
        lora = F.linear(F.linear(self.dropout(x.to(a.dtype)), a), b) * self.scale
        return y + ((ratio - 1) * w0x.to(ratio.dtype) + ratio * lora.to(ratio.dtype)).to(y.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        w0 = base_weight.float()
        v = w0 + super().delta_weight(w0)
        ratio = self._ratio(w0, self.lora_A, self.lora_B).float()
        return ratio[:, None] * v - w0

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().peft_state_dict(), "lora_magnitude_vector": self.magnitude}

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        return {**super().peft_config(cfg, target_modules, base_model, ranks), "use_dora": True}
