"""The chunked cross-entropy (trainer/loss.py) equals the unchunked one, loss and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, LlamaConfig, LlamaForCausalLM

from trainer.data import IGNORE_INDEX
from trainer.loss import AUTO_CHUNK_TOKENS, chunk_tokens_for, loss_sum

pytestmark = pytest.mark.unit


def _model(vocab: int = 1000) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def _loss_and_grads(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, chunk: int
) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, {"input_ids": ids}, labels, chunk)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_loss_and_gradients_equal_unchunked(chunk: int) -> None:
    """fp32, every parameter but the (frozen) head trainable: 1e-6 relative
    (per tensor, in norm: the chunks only reorder float32 sums; measured <= 1.2e-6 of the largest
    element at 57 one-token chunks). Labels hold ignored tokens (padding, prompts), both must skip."""
    model = _model()
    model.lm_head.requires_grad_(False)
    ids = torch.randint(3, 1000, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[2, 12:] = IGNORE_INDEX
    want = _loss_and_grads(model, ids, labels, 0)
    got = _loss_and_grads(model, ids, labels, chunk)
    assert len(got) == len(want) == sum(1 for _ in model.parameters())  # the loss + all but the head
    for a, b in zip(got, want, strict=True):
        assert ((a - b).norm() / b.norm()).item() <= 1e-6
    assert want[0] > 0


def test_a_bf16_chunked_gradient_is_scaled_in_float32() -> None:
    """bf16, the loss divided by its token count as the loop divides it: the hidden-state gradient of
    loss / 301 is the gradient of the loss, divided by 301 and rounded once. Scaling the bf16 gradient by
    1/301 rounded to bf16 (1.25e-3 off) shrank every element alike: the norm ratio was 1 - 1.25e-3, where
    a single rounding leaves it within 1e-4 (measured 1.9e-5)."""
    from trainer.loss import _ChunkedHeadLoss

    gen = torch.Generator().manual_seed(3)
    tokens, width, vocab = 300, 64, 1000
    weight = (0.02 * torch.randn(vocab, width, generator=gen)).bfloat16()
    hidden = torch.randn(tokens, width, generator=gen).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)

    def grad(scale: float) -> torch.Tensor:
        h = hidden.clone().requires_grad_(True)
        (_ChunkedHeadLoss.apply(h, weight, None, labels, 64) * scale).backward()
        assert h.grad is not None and h.grad.dtype == torch.bfloat16
        return h.grad.double()

    got, want = grad(1 / 301), grad(1.0) / 301
    assert (got - want).norm() / want.norm() <= 4e-3  # one bf16 rounding
    assert abs(got.norm() / want.norm() - 1) <= 1e-4


def test_a_trainable_head_is_refused() -> None:
    model = _model()
    ids = torch.randint(3, 1000, (1, 8))
    with pytest.raises(ValueError, match="head trains"):
        loss_sum(model, {"input_ids": ids}, ids, 4)


def test_the_head_is_restored_after_a_chunked_loss() -> None:
    model = _model()
    model.lm_head.requires_grad_(False)
    ids = torch.randint(3, 1000, (1, 8))
    loss_sum(model, {"input_ids": ids}, ids, 4)
    assert model(input_ids=ids).logits.shape == (1, 8, 1000)


def test_auto_chunks_only_large_vocabularies_without_post_head_transforms() -> None:
    assert chunk_tokens_for(None, LlamaConfig(vocab_size=128256)) == AUTO_CHUNK_TOKENS
    assert chunk_tokens_for(None, LlamaConfig(vocab_size=1024)) == 0
    assert chunk_tokens_for(0, LlamaConfig(vocab_size=128256)) == 0
    assert chunk_tokens_for(None, Gemma2Config(vocab_size=256000)) == 0  # soft-capped logits
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        chunk_tokens_for(512, Gemma2Config(vocab_size=256000))
