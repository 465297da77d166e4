"""Riemannian preconditioner for low-rank factor pairs, applied locally per layer in backward.

Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models", arXiv 2402.02347.
For each adapter pair A (r x in), B (out x r) the raw gradients become

    g_A' = (B^T B + d I)^-1 g_A        g_B' = g_B (A A^T + d I)^-1

and the base optimizer (AdamW, SGD) consumes g' (Adam's moments are moments of g'). The scale s of the
adapter is ignored; raw A and B are used, before the update.

Why it lives in backward: P is linear in g and A, B are the same on every rank, so P(sum of rank
gradients) = sum of P(rank gradient). Each layer's gradient is therefore preconditioned on its own rank,
before DeepSpeed reduces it, with no extra communication under DDP or ZeRO 1-3 and exactly the same
result under gradient accumulation. The factors are whole only inside their module's forward (ZeRO-3
gathers them there), so the r x r Gram matrices are formed in forward by an identity autograd function
wrapped around (A, B), kept, and used by that function's backward. All pending Gram matrices are
factorised and inverted together in one batched Cholesky (per rank size and device) on the first
backward call after a forward, in ``solve_dtype`` whatever the training dtype. A system that is
singular or not finite falls back to the identity for that layer and is counted, never a NaN.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from trainer.adapters.inject import adapter_layers


class _PairSlot:
    """The r x r state of one (A, B) pair: Gram matrices from the last forward and their factors."""

    __slots__ = ("gram_a", "gram_b", "inv_a", "inv_b", "owner")

    def __init__(self, owner: RiemannianPreconditioner) -> None:
        self.owner = owner
        self.gram_a: torch.Tensor | None = None  # A A^T
        self.gram_b: torch.Tensor | None = None  # B^T B
        self.inv_a: torch.Tensor | None = None  # (A A^T + D)^-1
        self.inv_b: torch.Tensor | None = None  # (B^T B + D)^-1

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _PreconditionGrad.apply(a, b, self)

    def set_grams(self, a: torch.Tensor, b: torch.Tensor) -> None:
        dtype = self.owner.solve_dtype
        a, b = a.detach(), b.detach()
        if a.dtype != dtype:
            a, b = a.to(dtype), b.to(dtype)
        self.gram_a, self.gram_b = a @ a.T, b.T @ b
        self.owner.pending.append(self)

    def solve_a(self, grad: torch.Tensor) -> torch.Tensor:
        """(B^T B + d I)^-1 g_A."""
        self.owner.factorize_pending()
        assert self.inv_b is not None
        return (self.inv_b @ grad.to(self.inv_b.dtype)).to(grad.dtype)

    def solve_b(self, grad: torch.Tensor) -> torch.Tensor:
        """g_B (A A^T + d I)^-1."""
        self.owner.factorize_pending()
        assert self.inv_a is not None
        return (grad.to(self.inv_a.dtype) @ self.inv_a).to(grad.dtype)


class _PreconditionGrad(torch.autograd.Function):
    """Identity on (A, B) in forward, recording their Gram matrices; preconditions their grads in backward."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, slot: _PairSlot) -> tuple[torch.Tensor, ...]:
        slot.set_grams(a, b)
        ctx.slot = slot
        return a.view_as(a), b.view_as(b)

    @staticmethod
    def backward(ctx: Any, grad_a: torch.Tensor, grad_b: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        slot: _PairSlot = ctx.slot
        return slot.solve_a(grad_a), slot.solve_b(grad_b), None


class RiemannianPreconditioner:
    """Owns the per-pair slots of a model and factorises their systems in batches.

    Each Gram matrix G (r x r) is regularised before the solve: ``absolute`` damping adds d I (the paper,
    PEFT); ``relative`` adds (d trace(G) / r + d_min) I, i.e. d times G's mean eigenvalue, so that the
    same d means the same conditioning whatever the scale of the factors.
    """

    def __init__(
        self,
        delta: float,
        solve_dtype: torch.dtype = torch.float32,
        damping: str = "absolute",
        delta_min: float = 0.0,
    ) -> None:
        if damping not in ("absolute", "relative"):
            raise ValueError(f"damping must be absolute or relative, not {damping!r}")
        self.delta = delta
        self.solve_dtype = solve_dtype
        self.damping = damping
        self.delta_min = delta_min
        self.slots: list[_PairSlot] = []
        self.pending: list[_PairSlot] = []
        self._fallbacks: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> int:
        """Give every adapter with (A, B) pairs a slot; returns the number of pairs."""
        for _, layer in adapter_layers(model):
            pairs = [(a, b) for a, b in layer.adapter.factor_pairs() if a.requires_grad and b.requires_grad]
            if len(pairs) > 1:
                raise NotImplementedError("one (A, B) pair per adapter is supported")
            if pairs:
                slot = _PairSlot(self)
                layer.adapter.pair_transform = slot
                self.slots.append(slot)
        return len(self.slots)

    @property
    def fallbacks(self) -> int:
        """Systems that fell back to the identity so far (reading it synchronises the device)."""
        return 0 if self._fallbacks is None else int(self._fallbacks.item())

    def factorize_pending(self) -> None:
        """Factorise the systems formed since the last call (a no-op for all but the first gradient).

        Not under torch.no_grad(): every gradient calls this, and entering that context cost ~40 us each
        time (7 ms a step for 84 pairs); the Gram matrices are detached, so no graph is built anyway."""
        if not self.pending:
            return
        groups: dict[tuple[int, torch.device], list[_PairSlot]] = defaultdict(list)
        for slot in self.pending:
            assert slot.gram_a is not None
            groups[(slot.gram_a.shape[-1], slot.gram_a.device)].append(slot)
        self.pending = []
        for slots in groups.values():
            grams = torch.stack([s.gram_a for s in slots] + [s.gram_b for s in slots])  # type: ignore[arg-type]
            inv = self._inverse(grams)
            n = len(slots)
            for i, slot in enumerate(slots):
                slot.inv_a, slot.inv_b = inv[i], inv[n + i]

    def regulariser(self, grams: torch.Tensor) -> torch.Tensor | float:
        """The damping added to each Gram matrix's diagonal: a number, or one per matrix, shape (n, 1)."""
        if self.damping == "absolute":
            return self.delta
        mean_eig = grams.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)
        return self.delta * mean_eig + self.delta_min

    def _inverse(self, grams: torch.Tensor) -> torch.Tensor:
        """(G + damping)^-1 of every system from one batched Cholesky; a system that fails (or is not
        finite) gets the identity. Applying an r x r inverse in backward is one GEMM per gradient, several
        times faster than a triangular solve with as many right-hand sides on CPU and GPU alike.

        A handful of batched, mostly in-place operations whatever the number of layers: the Python cost
        of a step must not grow with the model. cholesky_inverse raises on a zero pivot, so a failed
        factorisation (info > 0; LAPACK reports a NaN pivot so too) gets a unit diagonal first; its
        inverse, like that of a factor gone non-finite (an infinite Gram matrix), is then replaced by the
        identity. One sum per matrix finds every non-finite inverse."""
        n = grams.shape[0]
        grams.diagonal(dim1=-2, dim2=-1).add_(self.regulariser(grams))  # grams is the stack: ours to change
        chol, info = torch.linalg.cholesky_ex(grams)
        unfactored = info != 0
        chol.diagonal(dim1=-2, dim2=-1).masked_fill_(unfactored.view(n, 1), 1.0)
        inv = torch.cholesky_inverse(chol)
        failed = unfactored | ~inv.sum(dim=(-2, -1)).isfinite()
        inv.masked_fill_(failed.view(n, 1, 1), 0.0).diagonal(dim1=-2, dim2=-1).add_(failed.view(n, 1))
        count = failed.sum()
        self._fallbacks = count if self._fallbacks is None else self._fallbacks + count
        return inv
