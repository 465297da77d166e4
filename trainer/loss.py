"""The next-token loss, optionally in chunks of tokens so that a micro-batch's float32 logits never
exist whole (Llama-3's vocabulary of 128,256 at 2,048 tokens is 1 GB of float32 logits per sequence,
and as much again for their gradient).

How: during the model's forward the output head is *deferred* (it returns its input, the final hidden
states), then the loss runs the head on ``chunk`` tokens at a time, each chunk under activation
checkpointing, so that at most one chunk's logits (and, in backward, one chunk's recomputed logits and
their gradient) are alive at once. The head is called as a module, so DeepSpeed's ZeRO-3 hooks gather
its weight for each call as they would for the whole forward. The sum is the same cross-entropy as the
unchunked one (float32 per chunk; only the order of the final sum differs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.data import IGNORE_INDEX

# config fields of architectures that transform the logits after the head (Gemma 2's soft-capping,
# Cohere's and Granite's scaling): deferring the head would skip them, so those are never chunked.
_POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
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
    if any(getattr(model_config, f, None) for f in _POST_HEAD_FIELDS):
        if setting:
            fields = [f for f in _POST_HEAD_FIELDS if getattr(model_config, f, None)]
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


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss_sum(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``token_loss_sum(head(hidden), labels)`` with at most ``chunk`` tokens' logits alive at once."""
    h = hidden[:, :-1].flatten(0, 1)
    y = labels[:, 1:].flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        part = checkpoint(
            _chunk_loss, head, h[start : start + chunk], y[start : start + chunk], use_reentrant=False
        )
        total = total + part
    return total


def loss_sum(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """The micro-batch's summed token loss through ``model`` (a DeepSpeed engine or a transformers
    model); ``chunk`` tokens at a time when ``chunk`` > 0."""
    if not chunk:
        return token_loss_sum(model(**inputs, use_cache=False).logits, labels)
    module = getattr(model, "module", model)
    head = module.get_output_embeddings()
    with deferred_head(head):
        hidden = model(**inputs, use_cache=False).logits
    return chunked_token_loss_sum(hidden, head, labels, chunk)
