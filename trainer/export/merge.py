"""Fold a saved adapter into its base model: a plain transformers model directory, loadable with
``AutoModelForCausalLM.from_pretrained`` alone (no project code, no PEFT), with the logits of the
unmerged model.

A 4-bit base is rebuilt exactly as the run trained on it (NF4 at the run's compute dtype) and then
dequantised to that dtype, so the merged weights are W = dequant(W0) + Delta W: what the adapter was
trained against, not the original full-precision W0. Delta W is computed in float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from trainer.adapters import REGISTRY, adapter_layers, inject_adapters
from trainer.adapters.base_layers import base_weight, set_base_weight
from trainer.checkpoints import atomic_dir
from trainer.config import ModelConfig
from trainer.errors import MergeError
from trainer.export.adapter import OUR_CONFIG, SavedAdapter, load_adapter_state, load_saved_adapter
from trainer.model import DTYPES, load_base_model, quantized_digest

log = logging.getLogger(__name__)


def find_adapter_dir(path: Path) -> Path:
    """``path`` itself if it is an adapter directory, else a run directory's ``adapter/``."""
    for candidate in (path, path / "adapter"):
        if (candidate / OUR_CONFIG).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: neither an adapter directory nor a run directory holding adapter/")


def build_adapted_model(saved: SavedAdapter, base_path: str, device: torch.device) -> PreTrainedModel:
    """The base model the adapter was trained on (4-bit if it was), with the saved adapter loaded."""
    dtype = DTYPES[saved.dtype]
    model = load_base_model(ModelConfig(path=base_path, quantization=saved.quantization), dtype, device)
    names = inject_adapters(model, saved.cfg, dtype, ranks=saved.ranks)
    if sorted(names) != sorted(saved.modules):
        raise MergeError(
            f"{base_path}: the adapter's target_modules pick {len(names)} modules in this base, the adapter "
            f"was saved for {len(saved.modules)}: is it the same base model?"
        )
    load_adapter_state(model, saved.tensors)
    return model.eval()


@torch.no_grad()
def merge_into_base(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Dequantise every 4-bit layer to ``dtype``, fold each adapter into its base weight (in float32)
    and put the plain base layer back in the adapter's place. Returns the same model object."""
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers swaps every Linear4bit (adapted or not) for an nn.Linear and drops the
        # quantization config, so the saved config.json loads without bitsandbytes.
        model.dequantize(dtype=dtype)
    for name, layer in list(adapter_layers(model)):
        if not layer.adapter.mergeable:
            raise MergeError(
                f"{name}: {layer.adapter.method} adapters are input-dependent and cannot be merged"
            )
        w0 = base_weight(layer.base_layer, torch.float32)
        set_base_weight(layer.base_layer, w0 + layer.adapter.delta_weight(w0))
        model.set_submodule(name, layer.base_layer)
    return model


def check_base_digest(saved: SavedAdapter, model: PreTrainedModel, allow_mismatch: bool) -> None:
    """The re-quantised base must carry the bits the adapter was trained against (``base_digest``).

    bitsandbytes' CPU and CUDA quantisers need not agree bit for bit, nor two versions of either: a
    differing base is an error (the merged weights would not be the trained model's), or a warning with
    ``allow_mismatch``. Adapters saved before digests were recorded are merged as they are.
    """
    if saved.base_digest is None:
        return
    here = quantized_digest(model)
    if here == saved.base_digest:
        return
    device = next(model.parameters()).device.type
    message = (
        f"the 4-bit base rebuilt here (quantised on {device}, sha256 {str(here)[:12]}) differs from the one "
        f"the adapter was trained on (quantised on {saved.quantized_on}, sha256 {saved.base_digest[:12]}): "
        f"bitsandbytes' quantisers on different devices or versions need not give the same bits. Merge on "
        f"the device it trained on (--device {saved.quantized_on}), or accept the difference with "
        "--allow-base-mismatch"
    )
    if not allow_mismatch:
        raise MergeError(message)
    log.warning("%s; merging anyway", message)


def merge_adapter(
    source: Path,
    out: Path,
    base_path: str | None = None,
    device: str = "cpu",
    allow_base_mismatch: bool = False,
) -> Path:
    """Merge the adapter at ``source`` (an adapter or run directory) and write the full model to ``out``.

    ``base_path`` overrides the base model path recorded with the adapter (e.g. a moved copy). ``device``
    quantises, dequantises and merges there (the whole dequantised model must fit in its memory).
    """
    adapter_dir = find_adapter_dir(source)
    saved = load_saved_adapter(adapter_dir)
    method = REGISTRY[saved.cfg.method]
    if not method.mergeable:
        raise MergeError(
            f"{adapter_dir}: {saved.cfg.method} cannot be merged: its update depends on each input token "
            "(a router mixes its experts), so no single weight reproduces it; serve it with the adapter"
        )
    base = base_path or saved.base_model
    model = build_adapted_model(saved, base, torch.device(device))
    check_base_digest(saved, model, allow_base_mismatch)
    merge_into_base(model, DTYPES[saved.dtype])
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(tmp)
    log.info("merged %s (%s) into %s -> %s", adapter_dir, saved.cfg.method, base, out)
    return out
