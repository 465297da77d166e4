"""What the model's parameters cost, counted on the meta device from ``config.json`` alone.

The architecture is built exactly as the streaming loader builds it (trainer.model.stream
``read_config`` and ``build_skeleton``, transformers' own bitsandbytes quantizer swapping the linear
layers for ``Linear4bit`` on meta, so the same modules stay unquantised), and the configured adapters
are injected into it with the loader's own call (trainer.adapters ``inject_adapters``), so their
parameter count is exact. Nothing is read, downloaded or allocated.

A 4-bit weight of n elements costs what bitsandbytes stores for it (bitsandbytes/functional.py
``quantize_4bit`` and ``QuantState``; checked byte for byte against a real quantised layer in
tests/test_plan.py):

- the packed data: two 4-bit codes a byte, ceil(n / 2) bytes, stored as ``quant_storage`` elements
  (rounded up to whole elements);
- absmax: one per block of ``blocksize`` (64) elements; with double quantisation (``compress_statistics``)
  one uint8 a block, plus the nested state: one float32 absmax per 256 blocks, a 256-entry float32
  code and a float32 offset; without it one float32 a block;
- the 16-entry float32 NF4 code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainer.adapters import adapter_parameters, find_targets, inject_adapters
from trainer.adapters.base_layers import is_quantized
from trainer.config import RunConfig
from trainer.model.load import DTYPES, bnb_config
from trainer.model.stream import build_skeleton, read_config, units
from trainer.model.vocab import vocab_units

NESTED_BLOCKSIZE = 256  # bitsandbytes quantize_4bit: quantize_blockwise(absmax, blocksize=256)
NF4_CODE_ENTRIES = 16
DYNAMIC_CODE_ENTRIES = 256
FLOAT32 = 4


@dataclass(frozen=True)
class NF4Bytes:
    """One 4-bit weight's storage: packed codes (partitionable under ZeRO-3) and its quantisation
    constants (absmax, nested state, codes: attributes of the parameter, never partitioned)."""

    packed: int
    constants: int

    @property
    def total(self) -> int:
        return self.packed + self.constants


def nf4_bytes(numel: int, blocksize: int, double_quant: bool, storage_itemsize: int) -> NF4Bytes:
    """Bytes bitsandbytes holds for a weight of ``numel`` elements quantised to 4 bits."""
    packed_bytes = math.ceil(numel / 2)
    packed = math.ceil(packed_bytes / storage_itemsize) * storage_itemsize
    blocks = math.ceil(numel / blocksize)
    code = NF4_CODE_ENTRIES * FLOAT32
    if not double_quant:
        return NF4Bytes(packed, blocks * FLOAT32 + code)
    nested = math.ceil(blocks / NESTED_BLOCKSIZE) * FLOAT32 + DYNAMIC_CODE_ENTRIES * FLOAT32 + FLOAT32
    return NF4Bytes(packed, blocks + nested + code)


@dataclass
class UnitBytes:
    """One loading unit (a decoder layer, the embeddings, a norm, the head): its bytes whole."""

    name: str
    packed: int = 0
    constants: int = 0
    unquantized: int = 0
    largest_tensor: int = 0  # elements of its largest parameter (read whole while loading)
    linear4bit_max: int = 0  # elements of its largest 4-bit weight (dequantised whole in forward)

    @property
    def partitionable(self) -> int:
        """What ZeRO-3 partitions (every parameter's data; not the quantisation constants)."""
        return self.packed + self.unquantized


@dataclass
class ModelCounts:
    """The whole model's parameter bytes and the adapters' exact count, from a meta build."""

    units: list[UnitBytes]
    adapter_params: int
    adapted_modules: int
    param_itemsize: int
    head_bytes: int
    embed_bytes: int
    tied: bool
    config: object = field(repr=False)
    vocab_units: list[str] = field(default_factory=list)  # may be split by vocabulary rows (ZeRO-3)

    @property
    def packed(self) -> int:
        return sum(u.packed for u in self.units)

    @property
    def constants(self) -> int:
        return sum(u.constants for u in self.units)

    @property
    def unquantized(self) -> int:
        return sum(u.unquantized for u in self.units)

    @property
    def layers(self) -> list[UnitBytes]:
        return [u for u in self.units if u.name.split(".")[-1].isdigit()]

    @property
    def largest_tensor_bytes(self) -> int:
        return max(u.largest_tensor for u in self.units) * self.param_itemsize

    @property
    def vocab(self) -> int:
        return int(getattr(self.config, "vocab_size", 0))

    def gathered_units(self, vocab_sharded: bool) -> list[UnitBytes]:
        """The units ZeRO-3 gathers whole around their use (all but the vocabulary-sharded ones)."""
        return [u for u in self.units if not (vocab_sharded and u.name in self.vocab_units)]


def _param_bytes(module: nn.Module, unit: UnitBytes, seen: set[int]) -> None:
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            unit.largest_tensor = max(unit.largest_tensor, param.numel())
            if type(param).__name__ == "Params4bit":
                itemsize = param.__dict__["quant_storage"].itemsize
                size = nf4_bytes(param.numel(), param.__dict__["blocksize"],
                                 bool(param.__dict__["compress_statistics"]), itemsize)  # fmt: skip
                unit.packed += size.packed
                unit.constants += size.constants
                unit.linear4bit_max = max(unit.linear4bit_max, param.numel())
            else:
                unit.unquantized += param.numel() * param.element_size()


def build_meta_model(cfg: RunConfig, architecture: str | None = None, quantized: bool = True) -> Any:
    """The base on meta, as the loader builds it: NF4 ``Linear4bit`` layers when quantising (the
    quantisation a GPU run gets; on meta nothing is allocated)."""
    dtype = DTYPES[cfg.train.dtype]
    config, cls = read_config(architecture or cfg.model.path, cfg.model.attn_implementation)
    quant = bnb_config(cfg.model, dtype, torch.device("cuda")) if quantized else None
    return build_skeleton(config, cls, dtype, torch.device("meta"), quant)


def inject_meta_adapters(cfg: RunConfig, architecture: str | None = None) -> tuple[list[nn.Parameter], int]:
    """The configured adapters, injected by the loader's own call into the architecture on meta; and
    how many modules they adapt. Injected into the unquantised skeleton (same shapes): a 4-bit layer
    on meta cannot be dequantised, which DoRA's and Bat's initialisation read."""
    model = build_meta_model(cfg, architecture, quantized=False)
    targets = find_targets(model, cfg.adapter.target_modules)
    torch.manual_seed(cfg.train.seed)
    dtype = DTYPES[cfg.train.dtype]
    inject_adapters(model, cfg.adapter, dtype, ranks=_adaptive_ranks(cfg, targets), names=targets)
    return adapter_parameters(model), len(targets)


def _adaptive_ranks(cfg: RunConfig, targets: list[str]) -> dict[str, int] | None:
    """sara/mosara choose each module's rank from the base weight's singular values, which need the
    weights: the plan takes the largest rank they may choose (``adapter.sara.r_max``), an upper bound."""
    if cfg.adapter.method in ("sara", "mosara"):
        return dict.fromkeys(targets, cfg.adapter.sara.r_max)
    return None


def count_model(cfg: RunConfig, architecture: str | None = None) -> ModelCounts:
    """Every loading unit's bytes and the adapters' exact parameter count."""
    adapters, adapted = inject_meta_adapters(cfg, architecture)
    model = build_meta_model(cfg, architecture)
    seen: set[int] = set()
    counted = []
    for name, unit in units(model):
        entry = UnitBytes(name)
        _param_bytes(unit, entry, seen)
        counted.append(entry)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    embed: Any = model.get_input_embeddings()
    itemsize = DTYPES[cfg.train.dtype].itemsize
    head_bytes = head.weight.numel() * head.weight.element_size() if head is not None else 0
    tied = head is not None and head.weight is embed.weight
    vocab = vocab_units(model, find_targets(model, cfg.adapter.target_modules))
    return ModelCounts(
        units=counted, adapter_params=sum(p.numel() for p in adapters), adapted_modules=adapted,
        param_itemsize=itemsize, head_bytes=head_bytes,
        embed_bytes=embed.weight.numel() * embed.weight.element_size(), tied=tied, config=model.config,
        vocab_units=vocab,
    )  # fmt: skip


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_quantized(m)]
