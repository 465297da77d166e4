"""The next-token loss, optionally in chunks of tokens so that a micro-batch's float32 logits never
exist whole (Llama-3's vocabulary of 128,256 at 2,048 tokens is 1 GB of float32 logits per sequence,
and as much again for their gradient).

How: during the model's forward the output head is *deferred* (it returns its input, the final hidden
states). Then ``chunked_head_loss`` runs the frozen head on ``chunk`` tokens at a time and, for each
chunk, computes both its summed cross-entropy and its gradient with respect to the hidden states
(softmax - one-hot, times the head weight), so only one chunk's logits are ever alive and backward has
nothing to recompute. Under ZeRO-3 the head weight is gathered for that forward only (the ``gather``
context the loop passes, trainer.engine.gathered). The numbers are the unchunked ones: float32 logits
and softmax per chunk, the gradient cast to the head's dtype before the matmul as autograd would;
only the order of the final sums differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import IGNORE_INDEX
from trainer.model.vocab import ShardedHead, saved_grad_backward, sharded_head_loss, transforms_logits

AUTO_CHUNK_TOKENS = 1024
AUTO_MIN_VOCAB = 32000


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the tokens that carry loss (in float32)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def chunk_tokens_for(setting: int | None, model_config: Any) -> int:
    """Tokens per loss chunk (0: unchunked). ``setting`` None: chunk where it saves memory, i.e. a
    vocabulary of at least 32,000 (where the logits dwarf the hidden states), unless the architecture
    changes the logits after the head."""
    fields = transforms_logits(model_config)
    if fields:  # deferring the head would skip what they do: never chunked
        if setting:
            raise ValueError(f"train.loss_chunk_tokens: this architecture transforms its logits ({fields})")
        return 0
    if setting is None:
        return AUTO_CHUNK_TOKENS if int(getattr(model_config, "vocab_size", 0)) >= AUTO_MIN_VOCAB else 0
    return setting


@contextlib.contextmanager
def deferred_head(head: nn.Module) -> Iterator[None]:
    """Inside the block a call of ``head`` returns its input unchanged (the final hidden states)."""
    original = head.forward
    head.forward = lambda hidden, *args, **kwargs: hidden
    try:
        yield
    finally:
        head.forward = original


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum CE(hidden @ weight.T + bias, labels), chunk by chunk, its hidden-state gradient made in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        labels: torch.Tensor, chunk: int,
    ) -> torch.Tensor:  # fmt: skip
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Kept in float32 and scaled by the incoming gradient (the loop's 1/tokens) only in backward:
        # scaling a bf16 gradient by a bf16-rounded 1/tokens biased every element alike, by up to
        # 2^-9 (a 5-step bf16 run's first gradient norm was 2.2e-3 off the unchunked one's).
        grad = torch.zeros_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        for start in range(0, labels.numel(), chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            if grad is not None:
                keep = y != IGNORE_INDEX
                d_logits = logits.softmax(-1)
                d_logits[keep, y[keep]] -= 1.0
                d_logits[~keep] = 0.0
                grad[start : start + chunk] = d_logits.to(weight.dtype) @ weight
        ctx.dtype = hidden.dtype
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total

    backward = staticmethod(saved_grad_backward)


def chunked_head_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    chunk: int,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager[Any]] = lambda _: contextlib.nullcontext(),
) -> torch.Tensor:
    """``token_loss_sum(head(hidden), labels)`` with at most ``chunk`` tokens' logits alive at once. The
    head must be a frozen linear layer (its weight gets no gradient here)."""
    weight: nn.Parameter = head.weight  # type: ignore[assignment]
    bias: nn.Parameter | None = getattr(head, "bias", None)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("train.loss_chunk_tokens: the output head trains; chunk only a frozen head")
    h = hidden[:, :-1].flatten(0, 1)
    y = labels[:, 1:].flatten()
    with gather([p for p in (weight, bias) if p is not None]):
        loss: torch.Tensor = _ChunkedHeadLoss.apply(h, weight, bias, y, chunk)
    return loss


def loss_sum(
    model: Any,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    chunk: int,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager[Any]] = lambda _: contextlib.nullcontext(),
) -> torch.Tensor:
    """The micro-batch's summed token loss through ``model`` (a DeepSpeed engine or a transformers
    model); ``chunk`` tokens at a time when ``chunk`` > 0, the head's parameters made whole by ``gather``."""
    module = getattr(model, "module", model)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if isinstance(head, ShardedHead):  # split by vocabulary rows over the ranks: always this way
        with deferred_head(head):
            hidden = model(**inputs, use_cache=False).logits
        return sharded_head_loss(hidden[:, :-1].flatten(0, 1), head, labels[:, 1:].flatten(), chunk)
    if not chunk:
        return token_loss_sum(model(**inputs, use_cache=False).logits, labels)
    assert head is not None, "a chunked loss needs the model's output embeddings"
    with deferred_head(head):
        hidden = model(**inputs, use_cache=False).logits
    return chunked_head_loss(hidden, head, labels, chunk, gather)
