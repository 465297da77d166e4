"""The Riemannian preconditioner against its closed form (float64), and its failure modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.adapters import adapter_layers, freeze_base, inject_adapters
from trainer.config import AdapterConfig
from trainer.optim import RiemannianPreconditioner

pytestmark = pytest.mark.unit


def _adapted(in_f: int = 12, out_f: int = 10, rank: int = 3, b_std: float = 1.0) -> nn.Module:
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.Tanh(), nn.Linear(out_f, 7))
    inject_adapters(model, AdapterConfig(rank=rank, target_modules=["0", "2"]))
    freeze_base(model)
    for _, layer in adapter_layers(model):
        nn.init.normal_(layer.adapter.lora_B, std=b_std)
    return model


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _closed_form(a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, delta: float):
    a, b, ga, gb = (t.double() for t in (a, b, ga, gb))
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.inv(b.T @ b + delta * eye) @ ga, gb @ torch.linalg.inv(a @ a.T + delta * eye)


@pytest.mark.parametrize("delta", [0.0, 1e-2, 1.0])
def test_one_layer_equals_closed_form(delta: float) -> None:
    model = _adapted()
    x = torch.randn(5, 12)
    raw = _grads(model, x)
    pre = RiemannianPreconditioner(delta)
    assert pre.attach(model) == 2
    scaled = _grads(model, x)
    for name, layer in adapter_layers(model):
        a, b = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
        key = f"{name}.adapter.lora_"
        want_a, want_b = _closed_form(a, b, raw[key + "A"], raw[key + "B"], delta)
        torch.testing.assert_close(scaled[key + "A"].double(), want_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scaled[key + "B"].double(), want_b, rtol=1e-4, atol=1e-6)
    assert pre.fallbacks == 0


def test_float64_solve_is_exact() -> None:
    model = _adapted().double()
    x = torch.randn(5, 12, dtype=torch.float64)
    raw = _grads(model, x)
    RiemannianPreconditioner(0.1, solve_dtype=torch.float64).attach(model)
    scaled = _grads(model, x)
    layer = model[0].adapter
    want_a, want_b = _closed_form(layer.lora_A.detach(), layer.lora_B.detach(), raw["0.adapter.lora_A"],
                                  raw["0.adapter.lora_B"], 0.1)  # fmt: skip
    torch.testing.assert_close(scaled["0.adapter.lora_A"], want_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scaled["0.adapter.lora_B"], want_b, rtol=1e-10, atol=1e-12)


def test_bf16_gradients_are_solved_in_float32() -> None:
    """bf16 factors and gradients: the solve runs in float32 and only the result is rounded to bf16."""
    model = _adapted().to(torch.bfloat16)
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    raw = _grads(model, x)
    RiemannianPreconditioner(0.1).attach(model)
    scaled = _grads(model, x)
    layer = model[0].adapter
    want_a, want_b = _closed_form(layer.lora_A.detach(), layer.lora_B.detach(), raw["0.adapter.lora_A"],
                                  raw["0.adapter.lora_B"], 0.1)  # fmt: skip
    for got, want in ((scaled["0.adapter.lora_A"], want_a), (scaled["0.adapter.lora_B"], want_b)):
        assert got.dtype == torch.bfloat16
        # One bf16 rounding of the exact answer: relative error <= 2^-8.
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-6)


def test_singular_system_falls_back_to_identity_and_is_counted() -> None:
    """delta = 0 with B = 0 (the usual init) makes B^T B singular: identity for A, never NaN."""
    model = _adapted(b_std=0.0)
    for _, layer in adapter_layers(model):
        nn.init.zeros_(layer.adapter.lora_B)
    x = torch.randn(5, 12)
    raw = _grads(model, x)
    pre = RiemannianPreconditioner(0.0)
    pre.attach(model)
    scaled = _grads(model, x)
    assert pre.fallbacks == 2  # one B^T B system per layer
    for key, grad in scaled.items():
        assert torch.isfinite(grad).all()
        if key.endswith("lora_A"):
            torch.testing.assert_close(grad, raw[key])  # identity (and zero anyway: B = 0)


def test_non_finite_factors_fall_back() -> None:
    model = _adapted()
    with torch.no_grad():
        model[0].adapter.lora_A[0, 0] = float("inf")
    pre = RiemannianPreconditioner(1e-2)
    pre.attach(model)
    model(torch.randn(2, 12)).sum().backward()
    assert pre.fallbacks >= 1
    assert torch.isfinite(model[2].adapter.lora_A.grad).all()


def test_gradient_accumulation_is_linear() -> None:
    """P(g1) + P(g2) == P(g1 + g2): preconditioning per micro-batch equals preconditioning the sum."""
    model = _adapted()
    RiemannianPreconditioner(1e-2).attach(model)
    x1, x2 = torch.randn(3, 12), torch.randn(4, 12)
    for p in model.parameters():
        p.grad = None
    model(x1).pow(2).sum().backward()
    model(x2).pow(2).sum().backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    together = _grads(model, torch.cat([x1, x2]))
    for key in accumulated:
        torch.testing.assert_close(accumulated[key], together[key], rtol=1e-5, atol=1e-6)


def test_eval_forward_forms_no_system() -> None:
    model = _adapted()
    pre = RiemannianPreconditioner(1e-2)
    pre.attach(model)
    with torch.no_grad():
        model(torch.randn(2, 12))
    assert pre.generation == 0


def test_systems_follow_the_factors_from_step_to_step() -> None:
    """After an optimizer step the next backward solves with the new factors' systems, not the old."""
    model = _adapted()
    x = torch.randn(5, 12)
    pre = RiemannianPreconditioner(1e-2)
    pre.attach(model)
    _grads(model, x)
    with torch.no_grad():
        model[0].adapter.lora_B.mul_(3.0)  # as an optimizer step would change it
    unpreconditioned = _adapted()
    unpreconditioned.load_state_dict(model.state_dict())
    raw = _grads(unpreconditioned, x)
    scaled = _grads(model, x)
    layer = model[0].adapter
    want_a, _ = _closed_form(layer.lora_A.detach(), layer.lora_B.detach(), raw["0.adapter.lora_A"],
                             raw["0.adapter.lora_B"], 1e-2)  # fmt: skip
    torch.testing.assert_close(scaled["0.adapter.lora_A"].double(), want_a, rtol=1e-4, atol=1e-6)


def _train(model: nn.Module, watch: bool, steps: int = 3, accumulation: int = 2) -> RiemannianPreconditioner:
    pre = RiemannianPreconditioner(1e-2)
    pre.attach(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if watch:
        pre.watch(optimizer)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(accumulation):
            model(torch.randn(5, 12, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return pre


def test_a_watched_optimizer_forms_the_systems_once_per_accumulated_batch() -> None:
    """The factors change only at an optimizer step, so with accumulation the systems are formed once per
    step rather than once per micro-batch, and training is the same bit for bit."""
    per_forward, per_step = _adapted(), _adapted()
    per_step.load_state_dict(per_forward.state_dict())
    initial = {k: v.clone() for k, v in per_forward.state_dict().items()}
    formed = (_train(per_forward, watch=False).factorisations, _train(per_step, watch=True).factorisations)
    assert formed == (6, 3)
    want = per_forward.state_dict()
    for key, got in per_step.state_dict().items():
        assert torch.equal(got, want[key]), key
    assert not torch.equal(want["0.adapter.lora_A"], initial["0.adapter.lora_A"]), "it trained"


class _Checkpointed(nn.Module):
    """The first adapted layer's forward is recomputed in backward (non-reentrant checkpointing)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.inner[0], x, use_reentrant=False)
        return self.inner[2](self.inner[1](h))


def test_gradient_checkpointing_recomputation_forms_no_new_system() -> None:
    """Recomputed forwards are of submodules: one factorisation per step, and the same gradients."""
    plain = _adapted()
    checkpointed = _Checkpointed(_adapted())
    checkpointed.inner.load_state_dict(plain.state_dict())
    RiemannianPreconditioner(1e-2).attach(plain)
    pre = RiemannianPreconditioner(1e-2)
    pre.attach(checkpointed)
    calls = []
    factorize = pre.factorize
    pre.factorize = lambda slot: (calls.append(slot), factorize(slot))  # type: ignore[method-assign]
    x = torch.randn(5, 12)
    want, got = _grads(plain, x), _grads(checkpointed, x)
    assert len(calls) == 1 and pre.generation == 1
    for key in want:
        torch.testing.assert_close(got[f"inner.{key}"], want[key])


def test_conv_factors_are_preconditioned_in_their_own_shape() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 6, 3))
    inject_adapters(conv, AdapterConfig(rank=2, target_modules=["0"]))
    freeze_base(conv)
    nn.init.normal_(conv[0].adapter.lora_B)
    x = torch.randn(2, 3, 8, 8)
    raw = _grads(conv, x)
    RiemannianPreconditioner(0.1).attach(conv)
    scaled = _grads(conv, x)
    layer = conv[0].adapter
    a, b = layer.lora_A.detach().flatten(1), layer.lora_B.detach().flatten(1)
    ga, gb = raw["0.adapter.lora_A"].flatten(1), raw["0.adapter.lora_B"].flatten(1)
    want_a, want_b = _closed_form(a, b, ga, gb, 0.1)
    assert scaled["0.adapter.lora_A"].shape == layer.lora_A.shape
    torch.testing.assert_close(scaled["0.adapter.lora_A"].flatten(1).double(), want_a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled["0.adapter.lora_B"].flatten(1).double(), want_b, rtol=1e-4, atol=1e-6)


def test_relative_damping_scales_with_the_factor() -> None:
    """relative: G + (d tr(G)/r + d_min) I against its closed form in float64."""
    model = _adapted()
    x = torch.randn(5, 12)
    raw = _grads(model, x)
    RiemannianPreconditioner(0.1, damping="relative").attach(model)
    scaled = _grads(model, x)
    layer = model[0].adapter
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    gram_b, gram_a = b.T @ b, a @ a.T
    eye = torch.eye(3, dtype=torch.float64)
    want_a = torch.linalg.inv(gram_b + 0.1 * gram_b.trace() / 3 * eye) @ raw["0.adapter.lora_A"].double()
    want_b = raw["0.adapter.lora_B"].double() @ torch.linalg.inv(gram_a + 0.1 * gram_a.trace() / 3 * eye)
    torch.testing.assert_close(scaled["0.adapter.lora_A"].double(), want_a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled["0.adapter.lora_B"].double(), want_b, rtol=1e-4, atol=1e-6)


def test_attaching_twice_is_refused() -> None:
    pre = RiemannianPreconditioner(1e-2)
    pre.attach(_adapted())
    with pytest.raises(RuntimeError, match="already attached"):
        pre.attach(_adapted())


def test_the_gpus_sync_free_inverse_equals_the_float64_inverse() -> None:
    """GPUs invert through a triangular solve (no error codes copied to the host, unlike
    cholesky_inverse); it must give the same inverses, failed factorisations included."""
    from trainer.optim.riemannian import inverse_from_cholesky, triangular_inverse

    a = torch.randn(6, 5, 15, dtype=torch.float64)
    grams = a @ a.mT + 1e-2 * torch.eye(5, dtype=torch.float64)
    chol = torch.linalg.cholesky(grams.float())
    want = torch.linalg.inv(grams)
    assert torch.allclose(triangular_inverse(chol).double(), want, rtol=1e-4, atol=1e-6)
    assert torch.equal(inverse_from_cholesky(chol), torch.cholesky_inverse(chol)), (
        "CPU keeps cholesky_inverse"
    )
    singular = torch.zeros(1, 5, 5)
    singular.diagonal(dim1=-2, dim2=-1).fill_(1.0)  # what _inverse leaves of a failed factorisation
    assert torch.equal(triangular_inverse(singular), torch.eye(5).unsqueeze(0))
