"""Mo-SARA: a mixture of singular-value experts (Gu et al., arXiv 2408.03290). No official code exists:
this is our reading of the paper (docs/methods.md), not a port."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo, base_weight, weight_of
from trainer.adapters.layer import Adapter
from trainer.adapters.sara import from_rank0, svd_rank
from trainer.config import AdapterConfig

FORMAT_VERSION = 1


class MoSARA(Adapter):
    """Mo-SARA: Delta W(x) = U_k diag(sum_e g_e(x) lambda_e) V_k^T, g(x) = softmax(W_g x) over E experts.

    Paper: https://arxiv.org/abs/2408.03290. U_k, V_k: the top-k singular vectors of the (dequantised) base
    weight, frozen (k from SARA's rule, ``adapter.sara``, clipped to min(out, in)). Trainable: E vectors
    lambda_e of length k (zero-initialised, so Delta W = 0 at init) and the router W_g (kaiming-uniform,
    like nn.Linear; random, or the experts would stay identical forever). ``adapter.mosara.router_input``
    = subspace parameterises W_g = W_s V_k^T with only W_s (E x k) trainable. No scale.
    Forward per token: y = W0 x + U_k ((V_k^T x) * (Lambda^T g(x))). The update depends on the input, so
    it cannot be merged. Saved in our format with U_k and V_k (docs/adapter-format.md), so a loaded
    adapter never depends on a recomputed SVD.
    """

    method = "mosara"
    mergeable = False
    adaptive_rank = True
    u: torch.Tensor
    v: torch.Tensor

    def __init__(self, info: BaseLayerInfo, cfg: AdapterConfig, u: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__(info, u.shape[1])
        self.register_buffer("u", u.contiguous())  # (out, k), frozen
        self.register_buffer("v", v.contiguous())  # (in, k), frozen
        experts = cfg.mosara.num_experts
        self.lambdas = nn.Parameter(torch.zeros(experts, self.rank))
        router_in = self.rank if cfg.mosara.router_input == "subspace" else info.in_features
        self.router = nn.Parameter(torch.empty(experts, router_in))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self.subspace_router = cfg.mosara.router_input == "subspace"
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    @classmethod
    def from_base(
        cls, base_layer: nn.Module, info: BaseLayerInfo, cfg: AdapterConfig, rank: int | None = None
    ) -> Adapter:
        def top_k() -> list[torch.Tensor]:
            u, s, vh = torch.linalg.svd(base_weight(base_layer, torch.float32), full_matrices=False)
            k = min(rank or svd_rank(s, cfg.sara), s.numel())
            return [u[:, :k], vh[:k].T]

        u_k, v_k = from_rank0(top_k, 2, weight_of(base_layer).device)  # the same on every rank: rank 0's
        return cls(info, cfg, u_k, v_k)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = base_layer(x)
        x = self.dropout(x.to(self.lambdas.dtype))
        coords = x @ self.v  # V_k^T x: (..., k)
        logits = F.linear(coords if self.subspace_router else x, self.router)
        gates = torch.softmax(logits.float(), dim=-1).to(self.lambdas.dtype)
        return y + F.linear(coords * (gates @ self.lambdas), self.u).to(y.dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise ValueError("mosara's update depends on the input (its router): there is no Delta W to merge")

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "mosara_lambda": self.lambdas,
            "mosara_router.weight": self.router,
            "mosara_U": self.u,
            "mosara_V": self.v,
        }

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "peft_type": "MOSARA",
            "format": "riemann-tune",
            "format_version": FORMAT_VERSION,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_experts": cfg.mosara.num_experts,
            "router_input": cfg.mosara.router_input,
            "dropout": cfg.dropout,
            "rank_pattern": ranks,
            "target_modules": target_modules,
            "inference_mode": True,
        }
