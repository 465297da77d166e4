"""The base model: load from a local path, quantise, and turn it into a trainable adapter model.

``prepare_model`` is the one place where the transform order lives; DeepSpeed wraps its result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from trainer.adapters import REGISTRY, freeze_base, inject_adapters, rank_map, rank_table
from trainer.adapters.base_layers import is_quantized
from trainer.config import ModelConfig, RunConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def quantization_supported(device: torch.device) -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit runs on ``device``, and why not if it does not."""
    if device.type in ("cuda", "cpu"):
        return True, ""
    return False, f"bitsandbytes has no 4-bit kernels for device type {device.type!r}"


def load_base_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """Load the causal LM at ``cfg.path``, in 4-bit NF4 when asked and supported; never downloads."""
    if not (Path(cfg.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {cfg.path} holds no transformers model (no config.json)")
    quantization = None
    if cfg.quantization == "nf4":
        ok, why = quantization_supported(device)
        if ok:
            # quant_storage = compute dtype: the packed weight is a float tensor ZeRO-3 can partition.
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=dtype,
            )
        else:
            log.warning("model.quantization=nf4 ignored: %s; the base stays in %s", why, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device},
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
    )
    return model


def guard_4bit_gradients(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference-only layout.

    On CPUs with AVX512-BF16, a Linear4bit that once runs in eval mode on an input that needs no grad
    is repacked for inference, and from then on no gradient flows through it (silently: zero LoRA
    grads, or wrong ZeRO-3 losses). Turning the repack off keeps every later train pass correct.
    """
    layers = [m for m in model.modules() if is_quantized(m)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    return len(layers)


def prepare_model(cfg: RunConfig, device: torch.device) -> PreTrainedModel:
    """Base model -> trainable adapter model, in the one order that works:

    1. load (quantising at load: weights never exist in full precision on the device);
    2. guard the 4-bit layers against the CPU inference repack, before any forward can trigger it;
    3. inject adapters (seeded, so every rank starts from the same adapter weights);
    4. freeze everything but the adapters;
    5. gradient checkpointing last, so it wraps the layers that now hold adapters.
    DeepSpeed then wraps the result (trainer.engine).
    """
    dtype = DTYPES[cfg.train.dtype]
    model = load_base_model(cfg.model, dtype, device)
    guard_4bit_gradients(model)
    model.train()
    torch.manual_seed(cfg.train.seed)
    names = inject_adapters(model, cfg.adapter, dtype)
    freeze_base(model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    log.info("adapted %d modules with %s (rank %d)", len(names), cfg.adapter.method, cfg.adapter.rank)
    if REGISTRY[cfg.adapter.method].adaptive_rank:
        log.info("%s ranks from the SVD rule:\n%s", cfg.adapter.method, rank_table(rank_map(model)))
    return model


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts: a 4-bit weight counts its unpacked shape, a ZeRO-3
    partitioned one its whole size (``ds_numel``; its local tensor is empty outside a gather)."""
    trainable = total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        numel = (
            int(torch.Size(shape).numel()) if shape is not None else int(getattr(p, "ds_numel", p.numel()))
        )
        total += numel
        trainable += numel if p.requires_grad else 0
    return trainable, total
