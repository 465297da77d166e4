"""Adapter artefacts: export in PEFT's on-disk format, and load back (safetensors only).

An adapter directory holds ``adapter_config.json`` (PEFT's config for the method), ``adapter_model.
safetensors`` (tensors under PEFT's names: ``base_model.model.<module>.<tensor>``) and
``riemann_tune.json`` (our own adapter config, the per-module rank map and the base it was trained on, so
a loader never has to parse PEFT's). Methods PEFT lacks (flora, mosara) use the same layout with our own
names: docs/adapter-format.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.adapters import REGISTRY, adapter_layers, rank_map
from trainer.adapters.base_layers import is_fan_in_fan_out, is_supported
from trainer.checkpoints import atomic_dir
from trainer.config import AdapterConfig

PEFT_PREFIX = "base_model.model."
OUR_CONFIG = "riemann_tune.json"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor under its PEFT name, on the CPU. Under ZeRO-3 call it inside ``gathered``."""
    state = {}
    for name, layer in adapter_layers(model):
        for key, tensor in layer.adapter.peft_state_dict().items():
            state[f"{PEFT_PREFIX}{name}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


def peft_target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """Leaf names (q_proj, ...) when they pick out exactly the adapted modules, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    chosen = set(adapted)
    others = [
        n
        for n, m in model.named_modules()
        if is_supported(m) and not n.endswith(".base_layer") and n not in chosen
    ]
    overmatched = any(n.rsplit(".", 1)[-1] in leaves for n in others)
    return sorted(adapted) if overmatched else leaves


def save_adapter(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    cfg: AdapterConfig,
    base_model: str,
    out_dir: Path,
    *,
    quantization: str = "none",
    dtype: str = "fp32",
    base_digest: str | None = None,
    quantized_on: str = "cpu",
) -> None:
    """Write an adapter directory atomically (a crash leaves the previous one intact).

    ``quantization`` and ``dtype`` describe the base the adapter was trained on, so that a merge can
    rebuild exactly that base (a 4-bit one dequantised to the compute dtype); ``base_digest``
    (trainer.model.quantized_digest) and ``quantized_on`` (the device type that quantised it) let the
    merge check that its re-quantised base has the same bits.
    """
    adapted = [name for name, _ in adapter_layers(model)]
    ranks = rank_map(model)
    targets = peft_target_modules(model, adapted)
    peft_config = REGISTRY[cfg.method].peft_config(cfg, targets, base_model, ranks)
    if "fan_in_fan_out" in peft_config:  # GPT-2 style Conv1D bases: PEFT must transpose
        peft_config["fan_in_fan_out"] = any(
            is_fan_in_fan_out(layer.base_layer) for _, layer in adapter_layers(model)
        )
    ours = {
        "adapter": cfg.model_dump(mode="json"),
        "modules": adapted,
        "ranks": ranks,
        "base_model": base_model,
        "quantization": quantization,
        "dtype": dtype,
        "base_digest": base_digest,
        "quantized_on": quantized_on,
    }
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / OUR_CONFIG).write_text(json.dumps(ours, indent=2) + "\n")


@dataclass(frozen=True)
class SavedAdapter:
    """Everything an adapter directory holds, as written by ``save_adapter``."""

    cfg: AdapterConfig
    modules: list[str]
    ranks: dict[str, int]
    base_model: str
    quantization: Literal["nf4", "none"]
    dtype: Literal["fp32", "bf16"]
    tensors: dict[str, torch.Tensor]
    base_digest: str | None = None
    quantized_on: str = "cpu"


def load_saved_adapter(adapter_dir: Path) -> SavedAdapter:
    """Read an adapter directory (older ones, without ranks or base description, get the defaults)."""
    cfg, modules, base_model, tensors = read_adapter(adapter_dir)
    meta: dict[str, Any] = json.loads((adapter_dir / OUR_CONFIG).read_text())
    return SavedAdapter(
        cfg=cfg,
        modules=modules,
        ranks={str(k): int(v) for k, v in meta.get("ranks", {}).items()},
        base_model=base_model,
        quantization=meta.get("quantization", "none"),
        dtype=meta.get("dtype", "fp32"),
        tensors=tensors,
        base_digest=meta.get("base_digest"),
        quantized_on=meta.get("quantized_on", "cpu"),
    )


def read_adapter(adapter_dir: Path) -> tuple[AdapterConfig, list[str], str, dict[str, torch.Tensor]]:
    """(adapter config, adapted module names, base model path, tensors) of a saved adapter."""
    meta_path = adapter_dir / OUR_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: not an adapter directory written by this project ({OUR_CONFIG})"
        )
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    cfg = AdapterConfig.model_validate(meta["adapter"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return cfg, list(meta["modules"]), str(meta["base_model"]), tensors


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the model's adapters; every tensor must be used and every one present."""
    unused = dict(tensors)
    for name, layer in adapter_layers(model):
        for key, param in layer.adapter.peft_state_dict().items():
            full = f"{PEFT_PREFIX}{name}.{key}"
            if full not in unused:
                raise KeyError(f"adapter file lacks {full}")
            saved = unused.pop(full)
            if saved.shape != param.shape:
                raise ValueError(
                    f"{full}: saved shape {tuple(saved.shape)} != model shape {tuple(param.shape)}"
                )
            param.copy_(saved)
    if unused:
        raise KeyError(f"adapter file holds tensors for modules the model lacks: {sorted(unused)[:5]}")
