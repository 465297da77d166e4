"""Put adapters into a model: pick the target modules, wrap each, freeze everything else."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from trainer.adapters.base_layers import CONV_TYPES, LINEAR_TYPES, describe, weight_of
from trainer.adapters.layer import AdapterLayer
from trainer.adapters.registry import REGISTRY
from trainer.config import AdapterConfig, ConfigError


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the modules to adapt. ``all-linear``: every linear layer except the output head."""
    if targets == "all-linear":
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        return [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and m is not head]
    supported = LINEAR_TYPES + CONV_TYPES
    names = [n for n, m in model.named_modules() if isinstance(m, supported)]
    chosen = [n for n in names if any(_matches(n, p) for p in targets)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"adapter.target_modules: {targets} matched no module (candidates: {leaves})")
    return chosen


def inject_adapters(
    model: nn.Module,
    cfg: AdapterConfig,
    dtype: torch.dtype = torch.float32,
    ranks: Mapping[str, int] | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """Replace each target module by an AdapterLayer holding a new ``cfg.method`` adapter (in ``dtype``).

    ``ranks``: a saved rank map (module name -> rank) for methods that choose ranks per module, so a
    loaded adapter gets the shapes it was saved with. ``names``: the targets to wrap, when the caller
    already chose them (the streaming loader wraps one decoder layer's targets at a time); by default
    ``find_targets(model, cfg.target_modules)``.
    """
    adapter_cls = REGISTRY[cfg.method]
    names = find_targets(model, cfg.target_modules) if names is None else names
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        info = describe(base)
        if info.is_conv and not adapter_cls.supports_conv:
            conv_methods = ", ".join(m for m, c in REGISTRY.items() if c.supports_conv)
            raise ConfigError(
                f"adapter.target_modules: {name} is a {type(base).__name__}; {cfg.method} adapts linear "
                f"layers only ({conv_methods} adapt convolutions)"
            )
        try:
            adapter = adapter_cls.from_base(base, info, cfg, rank=(ranks or {}).get(name))
        except ValueError as e:  # a shape the method cannot take (bat's blocks, bone's rank)
            raise ConfigError(f"{name}: {e}") from None
        adapter.to(device=weight_of(base).device, dtype=dtype)
        setattr(parent, child, AdapterLayer(base, adapter))
    return names


def rank_map(model: nn.Module) -> dict[str, int]:
    """Module name -> the rank of its adapter (per module for sara and mosara)."""
    return {name: layer.adapter.rank for name, layer in adapter_layers(model)}


def rank_table(ranks: Mapping[str, int]) -> str:
    """The rank map as an aligned text table (what a run logs for adaptive-rank methods)."""
    width = max((len(n) for n in ranks), default=6)
    lines = [f"{'module':<{width}}  rank", f"{'-' * width}  ----"]
    lines += [f"{name:<{width}}  {rank:>4}" for name, rank in ranks.items()]
    total = sum(ranks.values())
    lines.append(f"{'(mean)':<{width}}  {total / max(1, len(ranks)):>4.1f}")
    return "\n".join(lines)


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train."""
    adapters = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in adapter_layers(model) for p in layer.adapter.parameters()]
