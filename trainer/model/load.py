"""The base model: load from a local path, quantise, and turn it into a trainable adapter model.

``prepare_model`` is the one place where the transform order lives; DeepSpeed wraps its result.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from trainer.adapters import REGISTRY, find_targets, freeze_base, inject_adapters, rank_map, rank_table
from trainer.adapters.base_layers import is_quantized
from trainer.config import FLASH_ATTENTION_NEEDS, ConfigError, ModelConfig, RunConfig
from trainer.model.speed import apply_liger, compile_layers
from trainer.model.stream import build_skeleton, load_units, read_config
from trainer.model.vocab import VocabSplit, logical_numel, sharded_units

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def quantization_supported(device: torch.device) -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit runs on ``device``, and why not if it does not."""
    if device.type in ("cuda", "cpu"):
        return True, ""
    return False, f"bitsandbytes has no 4-bit kernels for device type {device.type!r}"


def check_attention(cfg: ModelConfig, device: torch.device) -> None:
    """FlashAttention-2 needs its package and a GPU where the model is loaded. Without the package
    transformers falls back to fetching a kernel from the hub (offline: a failure deep in loading) or
    fails on the import; say so first, naming what to install."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    missing = [
        *(["the flash_attn module is not importable here"] if find_spec("flash_attn") is None else []),
        *([f"the model is on {device.type}, not a GPU"] if device.type != "cuda" else []),
    ]
    if missing:
        raise ConfigError(f"{FLASH_ATTENTION_NEEDS}: {'; '.join(missing)}")


def bnb_config(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> BitsAndBytesConfig | None:
    """The NF4 quantisation of the base, or None (not asked, or no 4-bit kernels on ``device``)."""
    if cfg.quantization != "nf4":
        return None
    ok, why = quantization_supported(device)
    if not ok:
        log.warning("model.quantization=nf4 ignored: %s; the base stays in %s", why, dtype)
        return None
    # quant_storage = compute dtype: the packed weight is a float tensor ZeRO-3 can partition.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_base_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The whole base through ``from_pretrained`` (in NF4 when asked), on ``device``; never downloads.

    Kept for what needs the whole base on one process anyway (merging an adapter into it) and as the
    reference the streaming loader is tested against; training loads through ``prepare_model``.
    """
    if not (Path(cfg.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {cfg.path} holds no transformers model (no config.json)")
    check_attention(cfg, device)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path,
        dtype=dtype,
        quantization_config=bnb_config(cfg, dtype, device),
        device_map={"": device},
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
    )
    # Every 4-bit base is guarded as it is loaded, for inference too (merge, generate, eval): the CPU
    # repack also corrupts every dequantised read of the weight, not only the gradients.
    guard_4bit_gradients(model)
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


def prepare_model(
    cfg: RunConfig,
    device: torch.device,
    partition: Callable[[nn.Module], None] | None = None,
    digest: BaseDigest | None = None,
) -> PreTrainedModel:
    """Base model -> trainable adapter model, streamed one decoder layer at a time (trainer.model.stream),
    in the one order that works, applied to each layer as soon as it is read:

    1. quantise its linear weights as they are read (never in full precision on the device);
    2. guard its 4-bit layers against the CPU inference repack, before any forward can trigger it;
    3. inject its adapters: the RNG is seeded once before the first layer and layers come in module
       order, so the adapters draw the same numbers as when injected into the whole model at once;
    4. freeze everything but the adapters;
    5. add its packed 4-bit weights to ``digest`` (while they are whole), then ``partition`` it (ZeRO-3:
       trainer.engine.layer_partitioner) before the next layer is read, so no rank ever holds more than
       its slice of the base plus one layer.
    Then gradient checkpointing, last, so it wraps the layers that now hold adapters. DeepSpeed wraps
    the result (trainer.engine); it finds the parameters already partitioned and leaves them be.
    """
    dtype = DTYPES[cfg.train.dtype]
    m = cfg.model
    check_attention(m, device)
    config, cls = read_config(m.path, m.attn_implementation)
    model = build_skeleton(config, cls, dtype, device, bnb_config(m, dtype, device))
    targets = find_targets(model, cfg.adapter.target_modules)

    def on_unit(prefix: str, unit: nn.Module) -> None:
        guard_4bit_gradients(unit)
        unit.train()
        inject_adapters(model, cfg.adapter, dtype, names=[n for n in targets if _within(n, prefix)])
        unit = model.get_submodule(prefix)  # the unit itself may have just been wrapped
        freeze_base(unit)
        if digest is not None:
            digest.update(unit)
        if partition is not None:
            partition(unit)

    torch.manual_seed(cfg.train.seed)
    load_units(model, m.path, device, dtype, on_unit, _vocab_split(cfg, model, targets, partition))
    model.train()
    freeze_base(model)
    return _finish(model, cfg, len(targets))


def _vocab_split(
    cfg: RunConfig, model: nn.Module, targets: list[str], partition: Callable[[nn.Module], None] | None
) -> tuple[VocabSplit, list[str]] | None:
    """Under ZeRO-3 (a ``partition``) over several ranks, the embedding and head to split by vocabulary
    rows (``distributed.shard_vocab``; not with Liger's kernels, whose fused loss needs the whole head)."""
    if partition is None or not cfg.distributed.shard_vocab or cfg.train.liger or not dist.is_initialized():
        return None
    split = VocabSplit.current()
    sharded = sharded_units(model, targets, split.world)
    if sharded:
        log.info("split by vocabulary rows over %d ranks (distributed.shard_vocab): %s", split.world, sharded)
    return (split, sharded) if sharded else None


def prepare_model_from_pretrained(cfg: RunConfig, device: torch.device) -> PreTrainedModel:
    """The same trainable model through ``from_pretrained``: the whole base on ``device``, partitioned
    (ZeRO-3) only later by ``deepspeed.initialize``. Not used for training: it is the baseline the
    streaming loader is tested against (tests/test_stream.py) and measured beside (bench.memory_load).
    """
    dtype = DTYPES[cfg.train.dtype]
    model = load_base_model(cfg.model, dtype, device)
    model.train()
    torch.manual_seed(cfg.train.seed)
    names = inject_adapters(model, cfg.adapter, dtype)
    freeze_base(model)
    return _finish(model, cfg, len(names))


def _finish(model: PreTrainedModel, cfg: RunConfig, adapted: int) -> PreTrainedModel:
    """Gradient checkpointing, so it wraps the layers that now hold adapters; then Liger's kernels, then
    regional compilation, last, so it traces the forward as it will run (trainer/model/speed.py)."""
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.train.liger:
        apply_liger(model, next(model.parameters()).device)
    if cfg.train.compile:
        log.info("compiling %d decoder layers one by one (train.compile)", compile_layers(model))
    log.info("adapted %d modules with %s (rank %d)", adapted, cfg.adapter.method, cfg.adapter.rank)
    if REGISTRY[cfg.adapter.method].adaptive_rank:
        log.info("%s ranks from the SVD rule:\n%s", cfg.adapter.method, rank_table(rank_map(model)))
    return model


class BaseDigest:
    """sha256 of every 4-bit layer's packed weight and quantisation state, in module order, fed one
    part of the model at a time (the streaming loader feeds each layer before ZeRO-3 partitions it).

    A merge re-quantises the base, on whatever device it runs: bitsandbytes' CPU and CUDA kernels round
    differently (torch bucketize against float bounds vs a CUDA kernel), and nothing promises the same
    bits. Recorded at training time and compared at merge, this says whether the merged base is the one
    the adapter was trained against. The module order (and so the digest) does not change when adapters
    wrap the layers.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.layers = 0

    def update(self, module: nn.Module) -> None:
        for layer in (m for m in module.modules() if is_quantized(m)):
            weight: Any = layer.weight  # a bitsandbytes Params4bit
            state = weight.quant_state
            parts = [weight.data, state.absmax]
            if state.nested:
                parts += [torch.as_tensor(state.offset), state.state2.absmax]
            for t in parts:
                self._sha.update(
                    t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
                )
            self.layers += 1

    def hexdigest(self) -> str | None:
        """The digest, or None when no 4-bit layer was seen."""
        return self._sha.hexdigest() if self.layers else None


def quantized_digest(model: nn.Module) -> str | None:
    """``BaseDigest`` of a whole (unpartitioned) model; None when it has no 4-bit layer."""
    digest = BaseDigest()
    digest.update(model)
    return digest.hexdigest()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts: a 4-bit weight counts its unpacked shape, a ZeRO-3
    partitioned one its whole size (``ds_numel``; its local tensor is empty outside a gather), an
    embedding or head split by vocabulary rows its whole matrix."""
    trainable = total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        numel = (
            int(torch.Size(shape).numel()) if shape is not None else int(getattr(p, "ds_numel", p.numel()))
        )
        total += numel
        trainable += numel if p.requires_grad else 0
    return trainable, total + logical_numel(model)  # + rows held as buffers (trainer.model.vocab)
