"""Activation memory of one micro-batch, measured on the meta device with the real layer code.

One decoder layer of the configured architecture, with the configured adapters injected (the same
``inject_adapters`` call as the loader), is run forward and backward on meta tensors of the real shape
(micro-batch x sequence length x hidden size). A ``TorchDispatchMode`` counts every tensor each aten
op allocates (views and in-place results excepted: they share storage) and releases it when the
tensor dies, so what autograd saves for backward, the forward's transients and the backward's peak
are those of the layer's real code: RMSNorm's float32 upcast, rotary embeddings, the attention kernel,
the MLP's intermediates, the adapters' own intermediates and dropout masks. Nothing is allocated.

Two things the meta run cannot do, added from the code that does them:

- the attention kernel: on meta, ``scaled_dot_product_attention`` falls back to its math
  decomposition (a float32 s x s score matrix). A real CPU or CUDA run with ``sdpa`` or
  ``flash_attention_2`` uses a fused kernel that keeps only the output and the log-sum-exp, so for those
  the meta run calls aten's fused flash kernel (``_scaled_dot_product_flash_attention_for_cpu``, whose
  meta kernel has the fused kernels' outputs); ``eager`` runs transformers' eager code as it is.
- a 4-bit base layer: the meta layer is built unquantised (plain ``nn.Linear`` with a frozen weight,
  which saves the same input for backward as bitsandbytes' ``MatMul4Bit``); bitsandbytes dequantises
  the weight whole in the compute dtype for each matmul, forward and backward, so one such weight
  (the layer's largest) is added to the transient peaks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.adapters import freeze_base, inject_adapters
from trainer.config import RunConfig
from trainer.model.load import DTYPES
from trainer.model.stream import build_skeleton, read_config


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensors aten ops allocate inside the block (meta tensors included)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, tensor in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            aliased = i < len(returns) and returns[i].alias_info is not None
            if isinstance(tensor, torch.Tensor) and not aliased:
                nbytes = tensor.untyped_storage().nbytes()
                self.live += nbytes
                weakref.finalize(tensor, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live


@dataclass(frozen=True)
class LayerActivations:
    """One decoder layer at one micro-batch shape, in bytes.

    retained: what stays alive after its forward until its backward (saved tensors and its output);
    forward_extra: its forward's transient peak above that; backward_extra: its backward's peak above
    what was alive when the backward started; hidden: one b x s x h tensor (a layer's input/output).
    """

    retained: int
    forward_extra: int
    backward_extra: int
    hidden: int
    norm_retained: int


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as the fused kernel real CPU/CUDA runs get (see module doc)."""
    original = F.scaled_dot_product_attention

    def fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:  # fmt: skip
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal or attn_mask is None, attn_mask=attn_mask, scale=scale
        )
        return out[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _one_layer_model(cfg: RunConfig, architecture: str | None) -> Any:
    dtype = DTYPES[cfg.train.dtype]
    attn = cfg.model.attn_implementation
    config, cls = read_config(architecture or cfg.model.path, "eager" if attn == "eager" else "sdpa")
    config.num_hidden_layers = 1
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:1]
    model = build_skeleton(config, cls, dtype, torch.device("meta"), None)
    ranks = None
    if cfg.adapter.method in ("sara", "mosara"):
        from trainer.adapters import find_targets

        ranks = dict.fromkeys(find_targets(model, cfg.adapter.target_modules), cfg.adapter.sara.r_max)
    inject_adapters(model, cfg.adapter, dtype, ranks=ranks)
    freeze_base(model)
    model.train()
    return model


def measure_layer(
    cfg: RunConfig, batch: int, seq_len: int, architecture: str | None = None
) -> LayerActivations:
    """Run one decoder layer forward and backward on meta at (batch, seq_len) and count its memory."""
    model = _one_layer_model(cfg, architecture)
    dtype = DTYPES[cfg.train.dtype]
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layer = inner.layers[0]
    hidden_size = model.config.hidden_size
    x = torch.empty(batch, seq_len, hidden_size, device="meta", dtype=dtype, requires_grad=True)
    positions = torch.arange(seq_len, device="meta")[None].expand(batch, -1)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        for name, buffer in list(rotary._buffers.items()):
            if buffer is not None:
                rotary._buffers[name] = buffer.to("meta")
    fused = cfg.model.attn_implementation != "eager"
    tracker = AllocationTracker()
    with _fused_attention() if fused else contextlib.nullcontext(), tracker:
        kwargs: dict[str, Any] = {"attention_mask": None, "position_ids": positions}
        if rotary is not None:
            kwargs["position_embeddings"] = rotary(x, positions)
        start = tracker.live
        tracker.reset_peak()
        y = layer(x, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        retained = tracker.live - start
        forward_extra = tracker.peak - tracker.live
        norm_start = tracker.live
        z = inner.norm(y)
        norm_retained = tracker.live - norm_start
        del z
        before_backward = tracker.live
        tracker.reset_peak()
        y.backward(torch.empty_like(y))
        backward_extra = tracker.peak - before_backward
    hidden = batch * seq_len * hidden_size * dtype.itemsize
    return LayerActivations(retained, forward_extra, backward_extra, hidden, norm_retained)
