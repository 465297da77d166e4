"""What an adapter may know about the frozen layer it wraps, whatever its kind.

Supported bases: ``nn.Linear``, bitsandbytes ``Linear4bit`` (dequantised only on request), transformers'
``Conv1D`` (GPT-2 style, weight stored in x out) and ``nn.Conv1d/2d/3d``. Weights are always exchanged in
PyTorch's (out, in, *kernel) layout, so the methods' maths never sees a storage detail.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)  # bnb.nn.Linear4bit subclasses nn.Linear
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class BaseLayerInfo:
    """Shape facts of a base layer; ``kernel_size`` is () for linear layers."""

    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    groups: int = 1
    quantized: bool = False

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel_size)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES + CONV_TYPES)


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True for transformers' Conv1D, which stores its weight as (in, out) (PEFT's ``fan_in_fan_out``)."""
    return isinstance(module, Conv1D)


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer. bitsandbytes is imported only by runs that quantise (its import costs
    seconds of CPU per process): if it is not loaded, no module can be one of its layers."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's ``weight`` parameter (typed)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def describe(module: nn.Module) -> BaseLayerInfo:
    """Shape facts of a supported base layer."""
    if isinstance(module, Conv1D):
        in_f, out_f = weight_of(module).shape
        return BaseLayerInfo(in_f, out_f)
    if isinstance(module, nn.Linear):
        return BaseLayerInfo(module.in_features, module.out_features, quantized=is_quantized(module))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        k = tuple(int(n) for n in module.kernel_size)
        return BaseLayerInfo(module.in_channels, module.out_channels, k, module.groups)
    raise TypeError(f"unsupported base layer {type(module).__name__}")


def base_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight in (out, in, *kernel) layout, dequantised if 4-bit; detached."""
    w = weight_of(module)
    if is_quantized(module):
        import bitsandbytes as bnb

        weight = bnb.functional.dequantize_4bit(w.data, w.quant_state)  # type: ignore[attr-defined]
    elif isinstance(module, Conv1D):
        weight = w.detach().T
    else:
        weight = w.detach()
    return weight.to(dtype) if dtype is not None else weight


def base_bias(module: nn.Module) -> torch.Tensor | None:
    """The module's bias (None if it has none)."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def conv_with(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base convolution (stride, padding, padding mode, dilation, groups) applied with another weight
    and no bias: how a conv adapter adds its Delta W without flattening the kernel."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"{type(module).__name__} is not a convolution")
    return module._conv_forward(x, weight.to(x.dtype), None)


def set_base_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a (non-quantised) base weight given in (out, in, *kernel) layout."""
    if is_quantized(module):
        raise ValueError(
            "cannot write into a 4-bit weight: dequantise the base model first (merge does this)"
        )
    target = weight_of(module)
    new = weight.T if isinstance(module, Conv1D) else weight
    with torch.no_grad():
        target.copy_(new.to(target.dtype))


def dequantize_module(module: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear holding the dequantised weight of a 4-bit layer."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(base_weight(module, dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(dtype))
    return linear.to(module.weight.device)
