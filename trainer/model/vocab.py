"""Under ZeRO-3, the embedding and the output head split by vocabulary rows, and never gathered.

ZeRO-3 partitions every parameter and gathers it whole around each use. For a decoder layer that is
the design working; for the embedding and the head it is the largest thing a rank ever holds besides
its share of the base: Llama-3's are 128,256 x 8,192 in bf16, 2.1 GB each, gathered at every forward
(and, over gloo on the CPU, staged twice more: measured, an all-gather of a 65 MB tensor raised a
rank's peak by 123 MB). On a small model that working set is larger than the whole 4-bit base, so
adding workers did not lower a rank's peak at all.

Here rank r of N keeps rows ``[r V/N, (r+1) V/N)`` of the (V, H) matrix as a buffer (the loader reads
only those rows from the checkpoint: the whole matrix never exists anywhere), and the two modules
compute with the rows they hold, exchanging activations instead of weights:

- ``ShardedEmbedding``: every rank looks up every rank's token ids in its own rows (zeros for ids it
  does not hold) and a reduce-scatter sums them, so each rank gets its own tokens' vectors. Each id
  is held by one rank, so the sum adds zeros: the vectors are bit-equal to a lookup in the whole
  matrix. Traffic: N x tokens x H per rank, against V x H for gathering the weight.
- ``sharded_head_loss``: the next-token cross-entropy of the frozen head, chunk by chunk. The ranks
  all-gather a chunk of hidden states; each computes float32 logits for its rows, and all-reduces of
  the row maxima, the sums of exponentials and the target logits give every token's log-softmax
  exactly as over the whole vocabulary (the order of the sums differs). The gradient with respect to
  the hidden states is (softmax - one-hot) times the rows, summed over ranks by a reduce-scatter.
  One chunk's logits cost what they cost unsharded: N x chunk tokens x V / N.
- ``ShardedHead``: the full logits of a rank's own tokens (generation, samples), by an all-to-all of
  the per-rank columns. No gradient flows through it: training goes through the loss above.

Every call is a collective: all ranks call it in step, as ZeRO-3 forwards already require. A rank
with fewer tokens pads (the token count is agreed by an all-reduce first).

It applies when the vocabulary divides by the world size and the module is a plain ``nn.Embedding``
or a bias-free ``nn.Linear`` that no adapter targets (``sharded_units``); otherwise the module stays a
ZeRO parameter as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.data import IGNORE_INDEX

# Tokens per rank looked up per exchange: N x this x H elements are alive at once.
EMBED_CHUNK_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class VocabSplit:
    """Which rows of a (vocab, hidden) matrix this rank holds."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> VocabSplit:
        return cls(dist.get_rank(), dist.get_world_size())

    def rows(self, vocab: int) -> tuple[int, int]:
        per = vocab // self.world
        return self.rank * per, (self.rank + 1) * per


def shardable(module: nn.Module, vocab: int) -> bool:
    """Whether ``module`` is an embedding or head over ``vocab`` rows that these classes reproduce exactly."""
    if type(module) is nn.Embedding:
        return module.max_norm is None and module.num_embeddings == vocab
    return type(module) is nn.Linear and module.bias is None and module.out_features == vocab


def _agreed_max(n: int, device: torch.device) -> int:
    count = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _padded(t: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    """``t`` (rows first) padded with ``value`` rows to ``length`` rows."""
    if t.shape[0] == length:
        return t.contiguous()
    pad = t.new_full((length - t.shape[0], *t.shape[1:]), value)
    return torch.cat([t, pad])


def _all_gather(t: torch.Tensor, world: int) -> torch.Tensor:
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    dist.all_gather_single(out, t.contiguous())
    return out


class ShardedEmbedding(nn.Module):
    """``nn.Embedding`` over this rank's vocabulary rows; a collective lookup of every rank's ids."""

    weight: torch.Tensor

    def __init__(self, rows: torch.Tensor, vocab: int, split: VocabSplit) -> None:
        super().__init__()
        # a buffer, not a parameter: ZeRO-3 must not partition (or gather) it again; not persistent,
        # so no checkpoint holds a rank's slice of the frozen base
        self.register_buffer("weight", rows, persistent=False)
        self.num_embeddings, self.embedding_dim = vocab, rows.shape[1]
        self.split = split
        self.start = split.rows(vocab)[0]

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows {self.start}..{self.start + len(self.weight)}"
        )

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        longest = _agreed_max(flat.numel(), flat.device)
        held = self.weight.shape[0]
        pieces = [self.weight.new_empty((0, self.embedding_dim))]
        for begin in range(0, longest, EMBED_CHUNK_TOKENS):
            size = min(EMBED_CHUNK_TOKENS, longest - begin)
            ids = _all_gather(_padded(flat[begin : begin + size], size), self.split.world) - self.start
            mine = (ids >= 0) & (ids < held)
            vectors = F.embedding(ids.clamp_(0, held - 1), self.weight)
            vectors[~mine] = 0
            piece = vectors.new_empty((size, self.embedding_dim))
            dist.reduce_scatter_single(piece, vectors)
            pieces.append(piece)
        return torch.cat(pieces)[: flat.numel()].view(*input_ids.shape, self.embedding_dim)


class ShardedHead(nn.Module):
    """A bias-free output ``nn.Linear`` over this rank's vocabulary rows (possibly the embedding's,
    tied). Its forward gives the full logits of this rank's tokens, without gradient."""

    weight: torch.Tensor

    def __init__(self, rows: torch.Tensor, vocab: int, split: VocabSplit) -> None:
        super().__init__()
        self.register_buffer("weight", rows, persistent=False)
        self.bias = None
        self.in_features, self.out_features = rows.shape[1], vocab
        self.split = split
        self.start = split.rows(vocab)[0]

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, rows {self.start}..{self.start + len(self.weight)}"
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:
            raise RuntimeError(
                "a vocabulary-sharded head has no backward: the training loss goes through "
                "trainer.loss.loss_sum (sharded_head_loss)"
            )
        world = self.split.world
        flat = hidden.reshape(-1, self.in_features)
        longest = _agreed_max(flat.shape[0], flat.device)
        every = _all_gather(_padded(flat, longest), world)  # (world * longest, H)
        local = F.linear(every, self.weight).view(world, longest, -1)  # every rank's tokens, my columns
        columns = torch.empty_like(local)
        dist.all_to_all_single(columns, local)  # [source rank] -> my tokens, that rank's columns
        logits = columns.permute(1, 0, 2).reshape(longest, self.out_features)[: flat.shape[0]]
        return logits.view(*hidden.shape[:-1], self.out_features)


def saved_grad_backward(
    ctx: Any, grad_out: torch.Tensor
) -> tuple[torch.Tensor | None, None, None, None, None]:
    """Backward of a loss that saved its float32 input gradient in forward: scaled, then cast once."""
    (grad,) = ctx.saved_tensors
    scaled = (grad * grad_out).to(ctx.dtype) if ctx.needs_input_grad[0] else None
    return scaled, None, None, None, None


class _ShardedHeadLoss(torch.autograd.Function):
    """sum CE(hidden @ W.T, labels) over this rank's tokens, W split by rows over the ranks."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        head: ShardedHead,
    ) -> torch.Tensor:
        world, rank = head.split.world, head.split.rank
        n = labels.numel()
        longest = _agreed_max(n, hidden.device)
        chunk = max(1, min(chunk or longest, longest))
        chunks = -(-longest // chunk)
        hidden_p = _padded(hidden, chunks * chunk)
        labels_p = _padded(labels, chunks * chunk, IGNORE_INDEX)
        every_label = _all_gather(labels_p.view(chunks, chunk), world)  # (world * chunks, chunk)
        every_label = every_label.view(world, chunks, chunk)
        held = rows.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # float32, scaled by the incoming gradient only in backward (see trainer.loss._ChunkedHeadLoss)
        grad = torch.zeros_like(hidden_p, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        for i in range(chunks):
            part = slice(i * chunk, (i + 1) * chunk)
            h = _all_gather(hidden_p[part], world)  # (world * chunk, H)
            y = every_label[:, i].reshape(-1)
            valid = y != IGNORE_INDEX
            local_y = y - head.start
            owned = valid & (local_y >= 0) & (local_y < held)
            logits = F.linear(h, rows).float()  # (world * chunk, V / world)
            target = torch.zeros_like(y, dtype=torch.float32)
            target[owned] = logits[owned, local_y[owned]]
            peak = logits.max(-1).values
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            exp = logits.sub_(peak[:, None]).exp_()  # in place: one chunk's float32 logits alive
            norm = exp.sum(-1)
            dist.all_reduce(norm)
            dist.all_reduce(target)
            token_loss = norm.log() + peak - target
            mine = slice(rank * chunk, (rank + 1) * chunk)
            total += token_loss[mine][valid[mine]].sum()
            if grad is not None:
                probs = exp.div_(norm[:, None])
                probs[owned, local_y[owned]] -= 1.0
                probs[~valid] = 0.0
                every_grad = (probs.to(rows.dtype) @ rows).float()  # the ranks' partials summed in fp32
                piece = every_grad.new_empty((chunk, every_grad.shape[1]))
                dist.reduce_scatter_single(piece, every_grad)
                grad[part] = piece
        ctx.dtype = hidden.dtype
        ctx.save_for_backward(grad[:n] if grad is not None else hidden.new_empty(0))
        return total

    backward = staticmethod(saved_grad_backward)


def sharded_head_loss(
    hidden: torch.Tensor, head: ShardedHead, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Summed next-token cross-entropy of this rank's ``hidden`` (tokens, H) against ``labels`` (tokens,)
    through the sharded ``head``, ``chunk`` tokens per rank at a time (0: all at once). Collective."""
    loss: torch.Tensor = _ShardedHeadLoss.apply(hidden, head.weight, labels, chunk, head)
    return loss


# config fields of architectures that transform the logits after the head (Gemma 2's soft-capping,
# Cohere's and Granite's scaling): a loss that defers the head would skip them.
POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def transforms_logits(model_config: Any) -> list[str]:
    """The fields of ``model_config`` that change the logits after the head."""
    return [f for f in POST_HEAD_FIELDS if getattr(model_config, f, None)]


def vocab_units(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the modules that may be split by vocabulary rows: the input embedding and the output
    head, each when ``shardable`` and no adapter targets it; the head only when the loss may defer it
    (nothing transforms the logits after it). Tied ones both or neither."""
    getters = (getattr(model, f"get_{side}_embeddings", None) for side in ("input", "output"))
    embedding, head = (get() if get is not None else None for get in getters)
    names = {id(m): n for n, m in model.named_modules()}
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0))

    def eligible(module: nn.Module | None) -> bool:
        if module is None or id(module) not in names or not shardable(module, vocab):
            return False
        name = names[id(module)]
        return not any(t == name or t.startswith(name + ".") for t in targets)

    chosen = [m for m in (embedding, head) if eligible(m)]
    if head in chosen and transforms_logits(config):
        chosen.remove(head)
    tied = embedding is not None and head is not None and embedding.weight is head.weight
    if tied and len(chosen) < 2:
        return []
    return [names[id(m)] for m in chosen]


def splits(vocab: int, world: int) -> bool:
    """Whether a vocabulary of ``vocab`` rows splits evenly over ``world`` (> 1) ranks."""
    return world > 1 and vocab > 0 and vocab % world == 0


def sharded_units(model: nn.Module, targets: list[str], world: int) -> list[str]:
    """``vocab_units`` when the vocabulary splits evenly over ``world`` ranks, else none."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0))
    return vocab_units(model, targets) if splits(vocab, world) else []


def logical_numel(model: nn.Module) -> int:
    """Elements of the whole matrices the sharded modules hold rows of (tied ones once)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, ShardedEmbedding):
            seen[module.weight.data_ptr()] = module.num_embeddings * module.embedding_dim
        elif isinstance(module, ShardedHead):
            seen[module.weight.data_ptr()] = module.out_features * module.in_features
    return sum(seen.values())
