"""Bone: block-affine adaptation (Kang, arXiv 2409.15371; PEFT's MiSS, default init)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo
from trainer.adapters.layer import Adapter
from trainer.config import AdapterConfig


def miss_config(
    cfg: AdapterConfig, target_modules: list[str], base_model: str, init_weights: bool | str
) -> dict[str, Any]:
    """adapter_config.json of PEFT's MiSS (Bone: ``init_weights`` true; Bat: "bat")."""
    return {
        "peft_type": "MISS",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "miss_dropout": cfg.dropout,
        "mini_r": 1,
        "target_modules": target_modules,
        "init_weights": init_weights,
        "bias": "none",
        "inference_mode": True,
    }


class Bone(Adapter):
    """Bone: y = W0 x + D^T s(x), with one trainable block D (r x out), zero-initialised; no scale.

    Paper: https://arxiv.org/abs/2409.15371 (named MiSS in PEFT). s(x) splits x into ceil(in / r) chunks
    of width r (the last zero-padded) and sums them, so s(x) has length r. As a weight,
    Delta W = [D^T | D^T | ... | the first (in mod r) columns of D^T]. Merge: W <- W0 + Delta W.
    Never reads the base weight, so a 4-bit base stays packed.
    """

    method = "bone"

    def __init__(self, info: BaseLayerInfo, cfg: AdapterConfig) -> None:
        if cfg.rank > info.in_features:
            raise ValueError(
                f"bone: adapter.rank {cfg.rank} exceeds the layer's in_features {info.in_features}"
            )
        super().__init__(info, cfg.rank)
        self.block = nn.Parameter(torch.zeros(cfg.rank, info.out_features))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        r = self.rank
        x = self.dropout(x.to(self.block.dtype))
        x = F.pad(x, (0, -x.shape[-1] % r))  # zero-pad the last chunk to width r
        chunk_sum = x.unflatten(-1, (-1, r)).sum(dim=-2)
        return y + (chunk_sum @ self.block).to(y.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        copies = math.ceil(self.info.in_features / self.rank)
        return self.block.float().T.repeat(1, copies)[:, : self.info.in_features]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.block}

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        return miss_config(cfg, target_modules, base_model, init_weights=True)
