"""Load the base model one piece at a time, so that it is never whole anywhere.

The architecture is built from ``config.json`` with every parameter on the meta device (buffers, such as
rotary frequencies, are small and computed for real). Then the model is walked in *units*: each decoder
layer (each element of a ``ModuleList``) is one, and so is each other module that holds parameters of
its own (embeddings, final norm, lm_head). For each unit, in the model's module order:

1. its tensors are read from the safetensors checkpoint, one at a time, cast to the load dtype on the
   device, and each linear weight is quantised to NF4 straight away, by the same call transformers
   makes (``bnb.nn.Params4bit(value, **meta_param.__dict__).to(device)``, see
   transformers/integrations/bitsandbytes.py ``Bnb4bitQuantize``), so the packed bytes, absmax and
   double-quant constants are the ones ``from_pretrained`` produces;
2. the caller's ``on_unit`` runs on it: adapters are injected and, under ZeRO-3, the unit is handed to
   DeepSpeed's partitioning, which frees everything but this rank's slice before the next unit is read.

Under ZeRO-3 the embedding and the head (the ``vocab`` units) are read differently: only this rank's
rows of the matrix are read, and the module is replaced by its vocabulary-sharded twin
(trainer/model/vocab.py), so those largest tensors of the model are never whole on any rank.

Peak memory is therefore the already-loaded part (partitioned under ZeRO-3) plus one unit, plus one
full-precision tensor in flight (the largest, usually the embedding or lm_head).
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import AutoHfQuantizer

from trainer.model.checkpoint import CheckpointError, CheckpointReader
from trainer.model.vocab import ShardedEmbedding, ShardedHead, VocabSplit

UnitHook = Callable[[str, nn.Module], None]
# (module, attribute name) of every place a parameter is registered: tied weights have several.
Slots = dict[int, list[tuple[nn.Module, str]]]


def read_config(path: str | Path, attn_implementation: str) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    """The model config and the causal-LM class ``config.json`` names; one clear error otherwise."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"model.path: {path} holds no transformers model (no config.json)")
    raw = json.loads(file.read_text())
    architectures = raw.get("architectures") or []
    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    causal = [a for a in architectures if a in known]
    if not causal:
        named = architectures or f"model_type {raw.get('model_type')!r} with no architectures"
        raise CheckpointError(
            f"{file}: architecture {named} is not a causal language model this loader knows "
            "(transformers' AutoModelForCausalLM mapping has no such class)"
        )
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    config._attn_implementation = attn_implementation
    import transformers

    return config, getattr(transformers, causal[0])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build in ``dtype``, as ``from_pretrained(dtype=...)`` does (transformers' ``local_torch_dtype``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_skeleton(
    config: PretrainedConfig,
    cls: type[PreTrainedModel],
    dtype: torch.dtype,
    device: torch.device,
    quantization: BitsAndBytesConfig | None,
) -> PreTrainedModel:
    """The architecture with its parameters on the meta device, linear layers already swapped for
    bitsandbytes' 4-bit ones when quantising (transformers' own quantizer does the swap, so the same
    modules stay unquantised: lm_head, tied weights, the model's keep-in-fp32 list)."""
    with _default_dtype(dtype), init_empty_weights(include_buffers=False):
        model = cls(config)
    # Tied weights become one parameter, loaded once (outside init_empty_weights, whose patched
    # register_parameter would make the tied copy a new parameter again).
    model.tie_weights()
    with _default_dtype(dtype):
        if quantization is not None:
            quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
            quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device})
            model.hf_quantizer = quantizer
    return model


def units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The pieces loaded one at a time, in module order: each element of a ModuleList (a decoder layer),
    and each other module with parameters of its own (embeddings, norms, lm_head)."""
    if isinstance(module, nn.ModuleList):
        for name, child in module.named_children():
            yield f"{prefix}{name}", child
        return
    if any(True for _ in module.parameters(recurse=False)):
        yield prefix.rstrip("."), module
        return
    for name, child in module.named_children():
        yield from units(child, f"{prefix}{name}.")


def _slots(model: nn.Module) -> tuple[Slots, dict[int, list[str]]]:
    """Where each parameter is registered, and all its names (a tied weight has several)."""
    slots: Slots = defaultdict(list)
    names: dict[int, list[str]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                slots[id(param)].append((module, attr))
                names[id(param)].append(f"{module_name}.{attr}" if module_name else attr)
    return slots, names


def _stored_name(names: list[str], reader: CheckpointReader, prefix: str) -> str:
    """The name the checkpoint stores a parameter under: any of its tied names, with or without the
    base-model prefix (a checkpoint saved from the bare decoder, e.g. GPT-2's ``h.0...``)."""
    bare = [n.removeprefix(prefix + ".") for n in names if prefix and n.startswith(prefix + ".")]
    candidates = names + bare
    for name in candidates:
        if name in reader:
            return name
    raise CheckpointError(f"{reader.directory}: the checkpoint has no tensor {names[0]!r}")


def _is_conv1d(module: nn.Module) -> bool:
    """A 4-bit layer that replaced a transformers Conv1D (GPT-2), whose checkpoint weight is (in, out)."""
    return issubclass(getattr(module, "source_cls", nn.Linear), Conv1D)


def _quantized(module: nn.Module, param: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    """NF4 weight, made exactly as transformers' ``Bnb4bitQuantize`` makes it (the meta parameter's
    attributes carry blocksize, quant type, double quant and storage dtype)."""
    import bitsandbytes as bnb

    if _is_conv1d(module):
        value = value.T
    fresh = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__)
    new: nn.Parameter = fresh.to(value.device)  # type: ignore[misc]  # .to() quantises
    return new


def _materialise(
    model: nn.Module, unit: nn.Module, reader: CheckpointReader, maps: tuple[Slots, dict[int, list[str]]],
    device: torch.device, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Read and place every still-empty parameter of ``unit``, one tensor at a time; tied copies
    elsewhere follow (they are the same parameter)."""
    slots, names = maps
    prefix = getattr(model, "base_model_prefix", "")
    for module in unit.modules():
        for param in list(module._parameters.values()):
            if param is None or not param.is_meta:
                continue
            four_bit = type(param).__name__ == "Params4bit"
            name = _stored_name(names[id(param)], reader, prefix)
            shape = torch.Size(reversed(param.shape)) if four_bit and _is_conv1d(module) else param.shape
            # transformers casts a weight it quantises to the load dtype, any other to its own dtype
            value = reader.read(name, shape).to(device=device, dtype=dtype if four_bit else param.dtype)
            if four_bit:
                new = _quantized(module, param, value)
            else:
                new = nn.Parameter(value, requires_grad=param.requires_grad)
            for owner, slot in slots[id(param)]:
                owner._parameters[slot] = new


def _shard_vocab(
    model: nn.Module, prefix: str, unit: nn.Module, reader: CheckpointReader,
    maps: tuple[Slots, dict[int, list[str]]], device: torch.device, split: VocabSplit,
    held: dict[int, torch.Tensor],
) -> None:  # fmt: skip
    """Replace the embedding or head ``unit`` by its vocabulary-sharded twin, reading only this rank's
    rows (once for tied weights: ``held`` maps the meta parameter to the rows read for it)."""
    param = unit.weight
    assert isinstance(param, nn.Parameter)
    vocab = param.shape[0]
    rows = held.get(id(param))
    if rows is None:
        name = _stored_name(maps[1][id(param)], reader, getattr(model, "base_model_prefix", ""))
        start, stop = split.rows(vocab)
        rows = reader.read_rows(name, param.shape, start, stop).to(device=device, dtype=param.dtype)
        held[id(param)] = rows
    twin = ShardedEmbedding if isinstance(unit, nn.Embedding) else ShardedHead
    parent, _, attr = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, twin(rows, vocab, split))


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for attr, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[attr] = buffer.to(device)


def load_units(
    model: PreTrainedModel, path: str, device: torch.device, dtype: torch.dtype, on_unit: UnitHook,
    vocab: tuple[VocabSplit, list[str]] | None = None,
) -> None:  # fmt: skip
    """Fill the skeleton ``model`` from the checkpoint at ``path``, unit by unit; ``on_unit(prefix, unit)``
    runs on each as soon as it is loaded, before the next is read (the caller injects adapters into it
    and partitions it there). ``vocab``: this rank's split and the units to shard by vocabulary rows
    (trainer.model.vocab.sharded_units)."""
    _move_buffers(model, device)
    maps = _slots(model)
    split, sharded = vocab if vocab is not None else (None, [])
    held: dict[int, torch.Tensor] = {}
    with CheckpointReader(path) as reader:
        for prefix, unit in list(units(model)):
            if split is not None and prefix in sharded:
                _shard_vocab(model, prefix, unit, reader, maps, device, split, held)
                continue
            _materialise(model, unit, reader, maps, device, dtype)
            on_unit(prefix, unit)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: the checkpoint left parameters unloaded: {left[:5]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.postprocess_model(model)
