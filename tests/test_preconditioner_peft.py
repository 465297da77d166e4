"""Several steps of scaled AdamW / scaled GD on a tiny Llama equal PEFT's Riemannian optimizer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_riemannian_optimizer
from transformers import AutoModelForCausalLM

from trainer.adapters import adapter_layers, freeze_base, inject_adapters
from trainer.config import AdapterConfig
from trainer.optim import RiemannianPreconditioner

pytestmark = pytest.mark.unit


def _models(model_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ours = copy.deepcopy(base)
    inject_adapters(ours, AdapterConfig(rank=8, alpha=16))
    freeze_base(ours)
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            layer.adapter.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.adapter.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return ours, theirs


@pytest.mark.parametrize(("optimizer", "lr"), [(torch.optim.AdamW, 3e-3), (torch.optim.SGD, 0.5)])
def test_our_preconditioner_equals_peft(tiny_model_dir: Path, optimizer: type, lr: float) -> None:
    ours, theirs = _models(tiny_model_dir)
    RiemannianPreconditioner(1e-2).attach(ours)
    opt_ours = optimizer([p for p in ours.parameters() if p.requires_grad], lr=lr)
    opt_theirs = create_riemannian_optimizer(theirs, optimizer, lr=lr, reg=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(3, ours.config.vocab_size, (4, 32), generator=gen)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for name, layer in adapter_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        for mine, peft_weight in ((layer.adapter.lora_A, peft_layer.lora_A["default"].weight),
                                  (layer.adapter.lora_B, peft_layer.lora_B["default"].weight)):  # fmt: skip
            torch.testing.assert_close(mine, peft_weight, rtol=1e-4, atol=1e-5, msg=name)
    moved = max(layer.adapter.lora_B.abs().max().item() for _, layer in adapter_layers(ours))
    assert moved > 1e-3, "the adapters did not train"
