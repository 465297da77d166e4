"""One matrix: every adapter method through the same checks, on the session's tiny Llama.

Init equals base exactly; merged equals unmerged (float32, 1e-5 relative) and unmerge restores the base;
only adapter parameters train and every one gets a gradient; the 4-bit base runs forward and backward
on CPU; save -> load is exact; PEFT loads our PEFT-format outputs with the same logits. Method-specific
references (PEFT, float64 einsum, SVD rule) are in test_adapter_references.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.adapter_cases import (
    IDS,
    METHODS,
    PEFT_FORMAT,
    adapted,
    adapter_config,
    load_base,
    logits,
    perturb,
    rel_err,
)
from trainer import config as config_lib
from trainer.adapters import REGISTRY, adapter_layers, adapter_parameters, rank_map
from trainer.adapters.base_layers import base_weight
from trainer.config import PAIRED_METHODS, ConfigError
from trainer.export import adapter_state_dict, load_adapter_state, load_saved_adapter, save_adapter
from trainer.optim import RiemannianPreconditioner

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> nn.Module:
    return load_base(tiny_model_dir)


@pytest.fixture(scope="module")
def base_logits(base: nn.Module) -> torch.Tensor:
    return logits(base)


def _loss(model: nn.Module) -> torch.Tensor:
    out = model(input_ids=IDS).logits
    return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), IDS[:, 1:].flatten())


@pytest.mark.parametrize("method", METHODS)
def test_init_equals_base_exactly(method: str, base: nn.Module, base_logits: torch.Tensor) -> None:
    assert torch.equal(logits(adapted(base, method)), base_logits)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_unmerge_restores(
    method: str, base: nn.Module, base_logits: torch.Tensor
) -> None:
    model = adapted(base, method)
    perturb(model)
    unmerged = logits(model)
    assert rel_err(unmerged, base_logits) > 1e-3, "the perturbed adapter changes nothing"
    layers = [layer for _, layer in adapter_layers(model)]
    if not REGISTRY[method].mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            layers[0].merge()
        return
    originals = [base_weight(layer.base_layer).clone() for layer in layers]
    for layer in layers:
        layer.merge()
    assert rel_err(logits(model), unmerged) <= 1e-5
    for layer, w0 in zip(layers, originals, strict=True):
        layer.unmerge()
        torch.testing.assert_close(base_weight(layer.base_layer), w0, rtol=0, atol=1e-6)
    assert rel_err(logits(model), unmerged) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_train_and_all_get_gradients(method: str, base: nn.Module) -> None:
    model = adapted(base, method)
    perturb(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model)} and trainable
    _loss(model).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("method", METHODS)
def test_4bit_base_forward_and_backward_on_cpu(method: str, tiny_model_dir: Path) -> None:
    """bf16 NF4 base as the demo trains it. Init is exact; then the bitsandbytes CPU trap (its account:
    trainer.model.guard_4bit_gradients): an eval pass first, then a train pass must give the gradients
    of a model that never ran in eval mode (a repacked layer passes no gradient, silently)."""
    base4 = load_base(tiny_model_dir, "nf4", torch.bfloat16)
    model = adapted(base4, method, torch.bfloat16).eval()
    assert torch.equal(logits(model), logits(base4))
    perturb(model)
    _loss(model.train()).backward()
    fresh = adapted(load_base(tiny_model_dir, "nf4", torch.bfloat16), method, torch.bfloat16).train()
    perturb(fresh)
    _loss(fresh).backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        if p.requires_grad:
            assert p.grad is not None and q.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def _saved(model: nn.Module, method: str, base_path: Path, out: Path) -> Path:
    save_adapter(adapter_state_dict(model), model, adapter_config(method), str(base_path), out)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_exact(
    method: str, base: nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = adapted(base, method)
    perturb(model)
    saved = load_saved_adapter(_saved(model, method, tiny_model_dir, tmp_path / "adapter"))
    assert saved.ranks == rank_map(model)
    fresh = adapted(base, method, ranks=saved.ranks)
    load_adapter_state(fresh, saved.tensors)
    assert torch.equal(logits(fresh), logits(model))
    for key, tensor in adapter_state_dict(fresh).items():
        assert torch.equal(tensor, saved.tensors[key]), key


@pytest.mark.parametrize("method", PEFT_FORMAT)
def test_peft_loads_our_output_with_the_same_logits(
    method: str, base: nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import copy

    from peft import PeftModel

    model = adapted(base, method)
    perturb(model)
    out = _saved(model, method, tiny_model_dir, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)


def test_paired_methods_are_those_with_factor_pairs(base: nn.Module) -> None:
    """The config's PAIRED_METHODS (which allow the preconditioner) match the adapters' factor_pairs."""
    with_pairs = {
        m for m in METHODS if next(iter(adapter_layers(adapted(base, m))))[1].adapter.factor_pairs()
    }
    assert with_pairs == PAIRED_METHODS


@pytest.mark.parametrize("method", sorted(PAIRED_METHODS))
def test_preconditioner_acts_on_every_paired_method(method: str, base: nn.Module) -> None:
    model = adapted(base, method)
    perturb(model)
    _loss(model).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    pre = RiemannianPreconditioner(1e-2)
    assert pre.attach(model) == len(list(adapter_layers(model)))
    _loss(model).backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.allclose(p.grad, raw[name]), f"{name}: gradient not preconditioned"
    assert pre.fallbacks == 0


@pytest.mark.parametrize("method", sorted(set(METHODS) - PAIRED_METHODS))
def test_riemannian_without_pairs_is_a_config_error(method: str) -> None:
    raw = {"model": {"path": "m"}, "data": {"train_path": "t"}, "output": {"dir": "o"}}
    with pytest.raises(ConfigError, match=rf"x\.yaml: optim\.preconditioner: riemannian .*{method} has none"):
        config_lib.validate({**raw, "adapter": {"method": method}}, "x.yaml")
    cfg = config_lib.validate({**raw, "adapter": {"method": method}, "optim": {"preconditioner": "none"}})
    assert cfg.adapter.method == method


def test_shape_errors_name_the_module(base: nn.Module) -> None:
    with pytest.raises(
        ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: bat: adapter\.rank 24 must divide"
    ):
        adapted(base, "bat", rank=24)
    raw = {"model": {"path": "m"}, "data": {"train_path": "t"}, "output": {"dir": "o"}}
    with pytest.raises(ConfigError, match=r"adapter\.dropout: bat updates the weight"):
        config_lib.validate({**raw, "adapter": {"method": "bat", "dropout": 0.1}})
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ConfigError, match="dora adapts linear layers only"):
        adapted(conv, "dora", target_modules=["0"])


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    """GPT-2 style: every projection is a transformers Conv1D, weight stored (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64)).eval()


@pytest.mark.parametrize("method", METHODS)
def test_conv1d_base_init_merge_and_gradients(method: str, gpt2: nn.Module) -> None:
    model = adapted(gpt2, method)
    assert {type(layer.base_layer).__name__ for _, layer in adapter_layers(model)} == {"Conv1D"}
    assert torch.equal(logits(model), logits(gpt2))
    perturb(model)
    unmerged = logits(model)
    _loss(model).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(model))
    if REGISTRY[method].mergeable:
        for _, layer in adapter_layers(model):
            layer.merge()
        assert rel_err(logits(model), unmerged) <= 1e-5


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_loads_our_conv1d_output(method: str, gpt2: nn.Module, tmp_path: Path) -> None:
    import copy

    from peft import PeftModel

    model = adapted(gpt2, method)
    perturb(model)
    out = _saved(model, method, tmp_path / "base", tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = PeftModel.from_pretrained(copy.deepcopy(gpt2), str(out)).eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)
