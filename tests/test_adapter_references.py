"""Each method against an independent reference on the same weights.

LoRA (and rsLoRA, and LoRA on a conv) and DoRA equal PEFT's; Bone and Bat equal PEFT's MiSS (default and
"bat"); FLoRA equals a hand-written float64 einsum over its Tucker factors (linear, and conv1d/2d/3d
with non-square kernels and groups); SARA's ranks equal the SVD rule computed with numpy; Mo-SARA
equals its per-token formula in float64 and keeps the base's singular vectors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.adapter_cases import IDS, adapted, load_base, logits, perturb, rel_err
from trainer.adapters import adapter_layers, rank_map
from trainer.adapters.base_layers import base_weight
from trainer.export import PEFT_PREFIX, load_adapter_state

pytestmark = pytest.mark.unit

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> nn.Module:
    return load_base(tiny_model_dir)


def _peft_twin(base: nn.Module, peft_config: Any, seed: int = 3) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A PEFT model on a copy of ``base`` with random adapter weights, and those weights under PEFT names."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    theirs = get_peft_model(copy.deepcopy(base), peft_config)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in get_peft_model_state_dict(theirs).items()
    }
    state = {k: (v.abs() + 0.5 if "magnitude" in k else v) for k, v in state.items()}
    set_peft_model_state_dict(theirs, state)
    return theirs.eval(), state


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = model(input_ids=IDS).logits
    F.cross_entropy(out[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare_with_peft(ours: nn.Module, theirs: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Same logits, and the same gradient for every adapter tensor (matched by module and PEFT name)."""
    load_adapter_state(ours, state)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    ours.train()
    ours_grads, their_grads = _grads(ours), _grads(theirs.train())
    assert len(ours_grads) == len(state) == len(their_grads)
    for name, layer in adapter_layers(ours):
        for key, param in layer.adapter.peft_state_dict().items():
            match = [
                g for n, g in their_grads.items() if n.startswith(f"{PEFT_PREFIX}{name}.{key.split('.')[0]}")
            ]
            assert len(match) == 1, (name, key)
            torch.testing.assert_close(ours_grads[_param_name(ours, param)], match[0], rtol=1e-4, atol=1e-6)


def _param_name(model: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


@pytest.mark.parametrize(("method", "rslora"), [("lora", False), ("lora", True), ("dora", False)])
def test_lora_and_dora_equal_peft(method: str, rslora: bool, base: nn.Module) -> None:
    from peft import LoraConfig

    peft_cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=LINEARS, use_rslora=rslora, use_dora=method == "dora"
    )
    theirs, state = _peft_twin(base, peft_cfg)
    _compare_with_peft(adapted(base, method, rslora=rslora), theirs, state)


@pytest.mark.parametrize(("method", "rank"), [("bone", 8), ("bone", 24), ("bat", 8)])
def test_bone_and_bat_equal_peft_miss(method: str, rank: int, base: nn.Module) -> None:
    """rank 24 does not divide in_features 64 or 128: Bone's zero-padded last chunk."""
    from peft import MissConfig

    peft_cfg = MissConfig(r=rank, target_modules=LINEARS, init_weights="bat" if method == "bat" else True)
    theirs, state = _peft_twin(base, peft_cfg)
    _compare_with_peft(adapted(base, method, rank=rank), theirs, state)


def test_lora_conv2d_equals_peft() -> None:
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Conv2d(4, 6, (3, 2), stride=2, padding=1))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    ours = adapted(base, "lora", rank=3, alpha=6, target_modules=["0"])
    state = {k: torch.randn(v.shape) for k, v in theirs.state_dict().items() if "lora_" in k}
    theirs.load_state_dict(state, strict=False)
    load_adapter_state(ours, {k.replace(".default", ""): v for k, v in state.items()})
    x = torch.randn(2, 4, 9, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


CONVS = [
    (nn.Conv1d(6, 4, 3, padding=1, groups=2), (2, 6, 11)),
    (nn.Conv2d(6, 8, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2), (2, 6, 9, 10)),
    (nn.Conv3d(4, 6, (1, 3, 2), groups=2), (1, 4, 3, 5, 6)),
]


def _tucker64(layer: nn.Module) -> torch.Tensor:
    """s * G x_1 U_out x_2 U_in ..., written out by hand for each order, in float64."""
    a = layer.adapter
    core, factors = a.core.double(), [u.double() for u in a.factors]
    spec = {
        2: "ab,ia,jb->ij",
        3: "abc,ia,jb,kc->ijk",
        4: "abcd,ia,jb,kc,ld->ijkl",
        5: "abcde,ia,jb,kc,ld,me->ijklm",
    }
    return a.scale * torch.einsum(spec[core.dim()], core, *factors)


@pytest.mark.parametrize(("conv", "shape"), CONVS, ids=["conv1d", "conv2d", "conv3d"])
def test_flora_conv_equals_float64_einsum(conv: nn.Module, shape: tuple[int, ...]) -> None:
    model = adapted(nn.Sequential(conv), "flora", rank=3, target_modules=["0"], flora={"spatial_rank": 2})
    perturb(model, std=0.3)
    layer = model[0]
    assert layer.adapter.core.shape[2:] == tuple(min(2, k) for k in conv.kernel_size)
    delta = _tucker64(layer)
    torch.testing.assert_close(
        layer.adapter.delta_weight(base_weight(conv)).double(), delta, rtol=1e-5, atol=1e-7
    )
    x = torch.randn(shape)
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    want = conv_fn(x.double(), conv.weight.double() + delta, conv.bias.double(), conv.stride, conv.padding,
                   conv.dilation, conv.groups)  # fmt: skip
    assert rel_err(model(x), want) <= 1e-6
    layer.merge()  # the kernel-shaped Delta W folds into the conv weight as is
    assert rel_err(model(x), want) <= 1e-6


def test_flora_linear_equals_float64_einsum() -> None:
    model = adapted(nn.Sequential(nn.Linear(12, 10)), "flora", rank=4, target_modules=["0"], rslora=True)
    perturb(model, std=0.3)
    lin, x = model[0].base_layer, torch.randn(3, 5, 12)
    want = x.double() @ (lin.weight.double() + _tucker64(model[0])).T + lin.bias.double()
    assert rel_err(model(x), want) <= 1e-6


def test_lora_grouped_conv_equals_float64_reference() -> None:
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    model = adapted(nn.Sequential(conv), "lora", rank=2, target_modules=["0"])
    perturb(model, std=0.3)
    a, b, s = model[0].adapter.lora_A.double(), model[0].adapter.lora_B.double(), model[0].adapter.scale
    delta = s * torch.einsum("or,rikl->oikl", b.flatten(1), a)
    x = torch.randn(2, 6, 5, 5)
    want = F.conv2d(x.double(), conv.weight.double() + delta, conv.bias.double(), padding=1, groups=2)
    assert rel_err(model(x), want) <= 1e-6
    model[0].merge()
    assert rel_err(model(x), want) <= 1e-6


def _svd_rule(weight: torch.Tensor, tau: float, r_min: int, r_max: int) -> int:
    """The rule as docs/methods.md states it, with numpy's float64 SVD and a plain loop."""
    s = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    total, running = s.sum(), 0.0
    for k, value in enumerate(s, start=1):
        running += value
        if running >= tau * total:
            return min(max(k, r_min), r_max)
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("method", "rule"), [("sara", (0.5, 1, 64)), ("sara", (0.3, 9, 12)), ("mosara", (0.8, 2, 64))]
)
def test_sara_ranks_equal_the_svd_rule(method: str, rule: tuple[float, int, int], base: nn.Module) -> None:
    tau, r_min, r_max = rule
    model = adapted(base, method, sara={"tau": tau, "r_min": r_min, "r_max": r_max})
    want = {n: _svd_rule(base_weight(base.get_submodule(n)), *rule) for n, _ in adapter_layers(model)}
    assert rank_map(model) == want
    assert len(set(want.values())) > 1, "a rule that gives every module the same rank tests little"
    for name, layer in adapter_layers(model):
        if method == "sara":
            assert layer.adapter.lora_A.shape[0] == want[name] and layer.adapter.scale == 16 / want[name]


def test_mosara_equals_its_formula_in_float64(base: nn.Module) -> None:
    """Delta W(x) = U_k diag(sum_e g_e(x) lambda_e) V_k^T per token; U_k, V_k: the top singular vectors."""
    model = adapted(base, "mosara", target_modules=["q_proj"], mosara={"num_experts": 3})
    perturb(model, std=0.5)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    a, w0 = layer.adapter, base_weight(layer.base_layer).double()
    u, v = a.u.double(), a.v.double()
    s = np.linalg.svd(w0.numpy(), compute_uv=False)[: a.rank]
    torch.testing.assert_close(u.T @ w0 @ v, torch.diag(torch.from_numpy(s)), rtol=1e-4, atol=1e-4)
    x = torch.randn(5, 64, dtype=torch.float64)
    gates = torch.softmax(x @ a.router.double().T, dim=-1)
    want = torch.stack([
        w0 @ xi + (u @ torch.diag(g @ a.lambdas.double()) @ v.T) @ xi for xi, g in zip(x, gates, strict=True)
    ])  # fmt: skip
    assert rel_err(layer(x.float()), want) <= 1e-6


def test_mosara_subspace_router_is_small(base: nn.Module) -> None:
    model = adapted(base, "mosara", mosara={"num_experts": 2, "router_input": "subspace"})
    for _, layer in adapter_layers(model):
        assert layer.adapter.router.shape == (2, layer.adapter.rank)
    perturb(model)
    out = model(input_ids=IDS).logits
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_sara_loads_saved_ranks_without_recomputing(base: nn.Module) -> None:
    """A loaded SARA adapter takes the saved rank map, even on a base whose spectrum would give others."""
    ranks = {n: 5 for n, _ in adapter_layers(adapted(base, "sara"))}
    model = adapted(base, "sara", ranks=ranks)
    assert rank_map(model) == ranks
