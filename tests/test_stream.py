"""The streaming loader (trainer/model/stream.py) against today's ``from_pretrained`` path.

Single process: the same parameters byte for byte (NF4 packed weights, absmax and double-quant
constants included), the same adapters, the same logits, on a sharded checkpoint; and one clear error
per kind of bad checkpoint. The 2-process ZeRO-2/3 equality lives in tests/test_stream_distributed.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from trainer import config as config_lib
from trainer.config import RunConfig
from trainer.model import prepare_model, prepare_model_from_pretrained
from trainer.model.checkpoint import CheckpointError
from trainer.model.stream import units

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
IDS = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(3))


def _run_config(
    model: Path, quant: str = "none", dtype: str = "fp32", method: str = "lora", attn: str = "sdpa"
) -> RunConfig:
    return config_lib.validate(
        {
            "model": {"path": str(model), "quantization": quant, "attn_implementation": attn},
            "adapter": {"method": method},
            "train": {"dtype": dtype},
            "data": {"train_path": "unused"},
            "output": {"dir": "unused"},
        }
    )


@pytest.fixture(scope="module")
def sharded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny model re-saved as several safetensors shards with an index."""
    out = tmp_path_factory.mktemp("sharded") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).save_pretrained(
        out, max_shard_size="100KB"
    )
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 2
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes (NF4 packed into bf16 storage holds NaN patterns, which torch.equal calls unequal)."""
    return t.detach().contiguous().view(torch.uint8)


def _assert_same_model(new: nn.Module, old: nn.Module) -> None:
    new_params, old_params = dict(new.named_parameters()), dict(old.named_parameters())
    assert new_params.keys() == old_params.keys()
    for name, p in old_params.items():
        q = new_params[name]
        assert (q.dtype, q.shape, q.requires_grad) == (p.dtype, p.shape, p.requires_grad), name
        assert torch.equal(_bytes(q), _bytes(p)), name
        state_old, state_new = getattr(p, "quant_state", None), getattr(q, "quant_state", None)
        assert (state_old is None) == (state_new is None), name
        if state_old is not None:
            a, b = state_old.as_dict(packed=True), state_new.as_dict(packed=True)
            assert a.keys() == b.keys(), name
            for key, value in a.items():
                same = torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]
                assert same, f"{name}: quant_state {key}"
    for (name, b), (_, b_old) in zip(new.named_buffers(), old.named_buffers(), strict=True):
        assert torch.equal(b, b_old), name
    with torch.no_grad():  # in eval mode: GPT-2's dropout would draw different masks (4-bit layers guarded)
        logits = new.eval()(input_ids=IDS).logits, old.eval()(input_ids=IDS).logits
        torch.testing.assert_close(*logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("quant", "dtype", "method"),
    [("none", "fp32", "lora"), ("nf4", "fp32", "lora"), ("nf4", "bf16", "lora"), ("nf4", "fp32", "dora")],
)
def test_streamed_model_equals_from_pretrained(sharded: Path, quant: str, dtype: str, method: str) -> None:
    """Every parameter (base and adapter) byte-equal, every NF4 constant equal, logits equal (0 diff).
    DoRA reads the dequantised base weight at injection: the layer must be loaded by then."""
    cfg = _run_config(sharded, quant, dtype, method)
    new, old = prepare_model(cfg, CPU), prepare_model_from_pretrained(cfg, CPU)
    if quant == "nf4":
        assert sum(type(p).__name__ == "Params4bit" for p in new.parameters()) == 14
    assert new.training and old.training
    _assert_same_model(new, old)


def test_tied_embeddings_load_once_and_stay_tied(tmp_path: Path) -> None:
    """A tied checkpoint has no lm_head.weight: the head is the embedding, loaded once."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    cfg = _run_config(tmp_path / "tied", "nf4")
    new = prepare_model(cfg, CPU)
    assert new.lm_head.weight is new.model.embed_tokens.weight
    _assert_same_model(new, prepare_model_from_pretrained(cfg, CPU))


def test_units_are_the_decoder_layers_and_the_loose_modules(sharded: Path) -> None:
    """What is loaded (and partitioned) at once: one decoder layer, or one embedding / norm / head."""
    model = prepare_model(_run_config(sharded), CPU)
    names = [name for name, _ in units(model)]
    assert names == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]


# ---- bad input: one clear error naming the file and the tensor / shard / architecture ----


def _single_file_copy(src: Path, dst: Path) -> Path:
    AutoModelForCausalLM.from_pretrained(src, local_files_only=True).save_pretrained(dst)
    return dst / "model.safetensors"


def test_a_missing_tensor_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = _single_file_copy(tiny_model_dir, tmp_path / "m")
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        prepare_model(_run_config(tmp_path / "m", "nf4"), CPU)


def test_a_misshapen_tensor_is_named_with_both_shapes(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = _single_file_copy(tiny_model_dir, tmp_path / "m")
    tensors = load_file(str(file))
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as caught:
        prepare_model(_run_config(tmp_path / "m"), CPU)
    message = str(caught.value)
    assert str(file) in message and "model.layers.0.self_attn.o_proj.weight" in message
    assert "[64, 32]" in message and "[64, 64]" in message


def test_an_index_naming_a_missing_shard_is_named(sharded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(sharded, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json names shard.*{shard.name}"):
        prepare_model(_run_config(copy), CPU)


def test_an_unknown_architecture_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    raw = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**raw, "architectures": ["FrobnicatorForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: architecture \['FrobnicatorForCausalLM'\]"):
        prepare_model(_run_config(copy), CPU)


def test_a_directory_without_safetensors_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors and no model\.safetensors\.index"):
        prepare_model(_run_config(copy), CPU)


def _tiny(kind: str) -> tuple[type, dict]:
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )  # fmt: skip

    shape = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    return {
        "mistral": (MistralForCausalLM, MistralConfig(**shape)),
        "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**shape, tie_word_embeddings=True)),
        "qwen2-untied": (Qwen2ForCausalLM, Qwen2Config(**shape, tie_word_embeddings=False)),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config(**shape, head_dim=16)),
        "phi3": (Phi3ForCausalLM, Phi3Config(**shape, pad_token_id=0)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    }[kind]


@pytest.mark.parametrize("kind", ["mistral", "qwen2-tied", "qwen2-untied", "gemma2", "phi3", "gpt2"])
def test_architectures_stream_like_from_pretrained(kind: str, tmp_path: Path) -> None:
    """Qwen2's attention biases, tied and untied heads, Gemma 2's norms and soft-capping, Phi-3's
    fused qkv_proj / gate_up_proj, GPT-2's Conv1D (transposed before quantising): NF4, byte-equal."""
    cls, config = _tiny(kind)
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / kind)
    cfg = _run_config(tmp_path / kind, "nf4", attn="eager" if kind == "gemma2" else "sdpa")
    _assert_same_model(prepare_model(cfg, CPU), prepare_model_from_pretrained(cfg, CPU))
