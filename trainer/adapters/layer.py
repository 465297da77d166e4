"""The shared adapter interface and the layer that puts an adapter beside a frozen base layer."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from trainer.adapters.base_layers import BaseLayerInfo, base_weight, set_base_weight
from trainer.config import AdapterConfig


class Adapter(nn.Module):
    """The trainable part of one adapted layer. One subclass per method (docs/methods.md).

    A method implements ``forward`` (the whole layer output, given the base layer), ``delta_weight``
    (Delta W, for merging) and names its tensors in ``peft_state_dict``; ``peft_config`` writes its
    adapter_config.json. Methods with low-rank (A, B) factor pairs list them in ``factor_pairs``: the
    optimizer preconditions their gradients (trainer.optim.riemannian).
    ``rank`` is the module's rank (per module for sara/mosara); the saved rank map is made of them.
    """

    method: ClassVar[str]
    mergeable: ClassVar[bool] = True
    """False for input-dependent updates (mosara): there is no single Delta W to fold in."""
    supports_conv: ClassVar[bool] = False
    """True if the method adapts nn.Conv1d/2d/3d too (lora, sara, flora)."""
    adaptive_rank: ClassVar[bool] = False
    """True if each module's rank is chosen from its base weight (sara, mosara); the rank map is logged."""

    def __init__(self, info: BaseLayerInfo, rank: int) -> None:
        super().__init__()
        self.info = info
        self.rank = rank

    @classmethod
    def from_base(
        cls, base_layer: nn.Module, info: BaseLayerInfo, cfg: AdapterConfig, rank: int | None = None
    ) -> Adapter:
        """A new adapter for ``base_layer``. ``rank``: one chosen earlier (a saved rank map); only methods
        with per-module ranks use it. Methods that read the base weight at init override this."""
        return cls(info, cfg)  # type: ignore[arg-type]  # methods take (info, cfg)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """Delta W in (out, in / groups, *kernel) layout, given the (dequantised) base weight."""
        raise NotImplementedError

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The (A, B) pairs the Riemannian preconditioner acts on: A is (r, in...), B is (out, r...)."""
        return []

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Saved tensors under the names PEFT gives them (ours where PEFT lacks the method), relative to
        the adapted module. Frozen tensors a method needs (mosara's singular vectors) are included."""
        raise NotImplementedError

    @classmethod
    def peft_config(
        cls, cfg: AdapterConfig, target_modules: list[str], base_model: str, ranks: dict[str, int]
    ) -> dict[str, Any]:
        """adapter_config.json for PEFT (or, for methods PEFT lacks, our documented equivalent)."""
        raise NotImplementedError


class AdapterLayer(nn.Module):
    """A frozen base layer plus one adapter; ``merge`` folds the adapter into the base weight."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.adapter(x, self.base_layer)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W0 + dW, computed in float32. The delta is kept so that ``unmerge`` can subtract the very
        same tensor even where dW depends on W0 (DoRA, Bat)."""
        if not self.adapter.mergeable:
            raise ValueError(f"{self.adapter.method} adapters are input-dependent and cannot be merged")
        if self.merged:
            raise RuntimeError("adapter is already merged")
        w0 = base_weight(self.base_layer, torch.float32)
        self._merged_delta = self.adapter.delta_weight(w0).float()
        set_base_weight(self.base_layer, w0 + self._merged_delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - dW: the base weight back, up to one rounding of the add and the subtract."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        w = base_weight(self.base_layer, torch.float32)
        set_base_weight(self.base_layer, w - self._merged_delta)
        del self._merged_delta
        self.merged = False
