"""Riemannian preconditioner for low-rank factor pairs, applied locally per layer in backward.

Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models", arXiv 2402.02347.
For each adapter pair A (r x in), B (out x r) the raw gradients become

    g_A' = (B^T B + d I)^-1 g_A        g_B' = g_B (A A^T + d I)^-1

and the base optimizer (AdamW, SGD) consumes g' (Adam's moments are moments of g'). The scale s of the
adapter is ignored; raw A and B are used, before the update.

Why it lives in backward: P is linear in g and A, B are the same on every rank, so P(sum of rank
gradients) = sum of P(rank gradient). Each layer's gradient is therefore preconditioned on its own rank,
before DeepSpeed reduces it, with no extra communication under DDP or ZeRO 1-3 and exactly the same
result under gradient accumulation. A gradient hook on each factor transforms its gradient as autograd
produces it, before it is accumulated (DeepSpeed's reduction hooks run after accumulation); forward pays
nothing per layer.

The r x r Gram matrices are formed where the factors are whole. Under DDP and ZeRO 0-2 they always are:
the first gradient after a forward of the model (once ``watch`` is on: after an optimizer step, so once
per accumulated batch) forms the Gram matrices of every pair in one tight loop (inside each layer's
forward they cost four times as much on CPU, between the model's large matmuls) and factorises all
systems in one batched Cholesky per rank. Under ZeRO-3 a factor is whole only while its module is
gathered, which it is while autograd computes that module's gradients, so each pair's systems are
formed and factorised at its first gradient. Either way the solves run in ``solve_dtype`` whatever
the training dtype, and a system that is singular or not finite falls back to the identity for that
layer and is counted, never a NaN.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from trainer.adapters.inject import adapter_layers


def _partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions: whole only while its module is gathered."""
    return hasattr(param, "ds_id")


class _PairSlot:
    """One (A, B) pair: its factors, gradient hooks and the inverses of its current systems."""

    __slots__ = ("a", "b", "generation", "inv_a", "inv_b", "owner")

    def __init__(self, owner: RiemannianPreconditioner, a: nn.Parameter, b: nn.Parameter) -> None:
        self.owner = owner
        self.a, self.b = a, b
        self.generation = -1  # the forward the inverses belong to
        self.inv_a: torch.Tensor | None = None  # (A A^T + D)^-1
        self.inv_b: torch.Tensor | None = None  # (B^T B + D)^-1
        a.register_hook(self.precondition_a)
        b.register_hook(self.precondition_b)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A A^T and B^T B in the solve dtype (the factors as matrices: r x fan-in, out x r)."""
        a, b, dtype = self.a.flatten(1), self.b.flatten(1), self.owner.solve_dtype
        if a.dtype != dtype:
            a, b = a.to(dtype), b.to(dtype)
        return a @ a.T, b.T @ b

    def inverses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A A^T + D)^-1 and (B^T B + D)^-1 of the current factors, factorised at the first call."""
        if self.generation != self.owner.generation:
            self.owner.factorize(self)
        assert self.inv_a is not None and self.inv_b is not None
        return self.inv_a, self.inv_b

    def precondition_a(self, grad: torch.Tensor) -> torch.Tensor:
        """(B^T B + d I)^-1 g_A, solved in the solve dtype and returned in the gradient's."""
        inv = self.inverses()[1]
        if grad.dtype == inv.dtype and grad.dim() == 2:
            return inv @ grad
        return (inv @ grad.flatten(1).to(inv.dtype)).to(grad.dtype).view_as(grad)

    def precondition_b(self, grad: torch.Tensor) -> torch.Tensor:
        """g_B (A A^T + d I)^-1."""
        inv = self.inverses()[0]
        if grad.dtype == inv.dtype and grad.dim() == 2:
            return grad @ inv
        return (grad.flatten(1).to(inv.dtype) @ inv).to(grad.dtype).view_as(grad)


def triangular_inverse(chol: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 = L^-T L^-1 from a batch of lower Cholesky factors L, by a triangular solve: it has no
    error codes to check, so it never synchronises a GPU with the host."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return chol_inv.mT @ chol_inv


def inverse_from_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 for a batch of lower Cholesky factors, without a host sync on a GPU.

    torch.cholesky_inverse checks its LAPACK / cuSOLVER error codes on the host: free on a CPU, where they
    are, and faster there (rank 64, 224 systems, one thread: 33 ms against 54 for the triangular solve);
    on a GPU a device sync per call, i.e. per pair and step under ZeRO-3. So GPUs take the solve.
    """
    return torch.cholesky_inverse(chol) if chol.device.type == "cpu" else triangular_inverse(chol)


class RiemannianPreconditioner:
    """Owns the per-pair slots of a model and factorises their systems in batches.

    Attach it to the module that is called for each step (the model DeepSpeed wraps): a forward pre-hook
    there marks the systems stale, so that a forward of a submodule alone would precondition with the
    previous step's systems. Gradient checkpointing's recomputed forwards are of submodules, and rightly
    form no new systems. Once it ``watch``-es the optimizer, a forward marks them stale only after an
    optimizer step, the only place the factors change: with gradient accumulation the systems are formed
    once per accumulated batch rather than once per micro-batch.

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
        self.generation = 0  # forwards with gradients that found the factors changed
        self.factorisations = 0  # batched (under ZeRO-3: per-pair) factorisations so far
        self._watching = False  # an optimizer step tells when the factors change, not every forward
        self._stepped = True  # the factors may have changed since the systems were last marked stale
        self._fallbacks: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> int:
        """Hook every trainable (A, B) pair of the model's adapters; returns the number of pairs."""
        if self.slots:
            raise RuntimeError("this preconditioner is already attached")
        for _, layer in adapter_layers(model):
            for a, b in layer.adapter.factor_pairs():
                if a.requires_grad and b.requires_grad:
                    self.slots.append(_PairSlot(self, a, b))
        model.register_forward_pre_hook(self._forward_started)
        return len(self.slots)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Form new systems only after a step of ``optimizer`` (the one updating the factors; DeepSpeed
        calls its ``step`` inside its own) instead of at every forward with gradients."""
        optimizer.register_step_post_hook(self._optimizer_stepped)
        self._watching = True

    def _optimizer_stepped(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._stepped = True

    def _forward_started(self, module: nn.Module, args: object) -> None:
        if torch.is_grad_enabled() and self._stepped:
            self.generation += 1
            self._stepped = not self._watching

    @property
    def fallbacks(self) -> int:
        """Systems that fell back to the identity so far (reading it synchronises the device)."""
        return 0 if self._fallbacks is None else int(self._fallbacks.item())

    @torch.no_grad()
    def factorize(self, slot: _PairSlot) -> None:
        """Form and factorise the current systems of ``slot``, and of every pair whose factors are whole
        now too (all of them, but under ZeRO-3)."""
        slots = [slot] if _partitioned(slot.a) else [s for s in self.slots if not _partitioned(s.a)]
        self.factorisations += 1
        groups: dict[tuple[int, torch.device], list[tuple[_PairSlot, torch.Tensor, torch.Tensor]]]
        groups = defaultdict(list)
        for s in slots:
            gram_a, gram_b = s.grams()
            groups[(gram_a.shape[-1], gram_a.device)].append((s, gram_a, gram_b))
        for group in groups.values():
            grams = torch.stack([g[1] for g in group] + [g[2] for g in group])
            inv = self._inverse(grams)
            n = len(group)
            for i, (s, _, _) in enumerate(group):
                s.inv_a, s.inv_b, s.generation = inv[i], inv[n + i], self.generation

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
        of a step must not grow with the model. None of them synchronises a GPU with the host, so the
        gradient hooks (one factorisation per pair under ZeRO-3) never stall backward: cholesky_ex leaves
        its error codes on the device, and so does ``inverse_from_cholesky``. A failed factorisation
        (info > 0; LAPACK reports a NaN pivot so too) gets a unit diagonal first, so the inverse stays
        finite (cholesky_inverse raises on a zero pivot); it, like the inverse of a factor gone non-finite
        (an infinite Gram matrix), is then replaced by the identity. One sum per matrix finds every
        non-finite inverse."""
        n = grams.shape[0]
        grams.diagonal(dim1=-2, dim2=-1).add_(self.regulariser(grams))  # grams is the stack: ours to change
        chol, info = torch.linalg.cholesky_ex(grams)
        unfactored = info != 0
        chol.diagonal(dim1=-2, dim2=-1).masked_fill_(unfactored.view(n, 1), 1.0)
        inv = inverse_from_cholesky(chol)
        failed = unfactored | ~inv.sum(dim=(-2, -1)).isfinite()
        inv.masked_fill_(failed.view(n, 1, 1), 0.0).diagonal(dim1=-2, dim2=-1).add_(failed.view(n, 1))
        count = failed.sum()
        self._fallbacks = count if self._fallbacks is None else self._fallbacks + count
        return inv
