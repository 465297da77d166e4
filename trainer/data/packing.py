"""Packing examples into rows, and collating rows into the tensors a micro-batch feeds the model.

A packed row holds whole examples back to back. Its ``position_ids`` restart at 0 for every example,
and no ``attention_mask`` is passed: transformers (5.x, Llama and the other models built on its
masking utilities) then reads the example boundaries from the position ids and masks attention
block-diagonally (sdpa and eager build that mask; flash-attention runs variable-length kernels, for a
batch of one row only, hence ``flat``), so no token attends across examples. This needs the forward
to run without a KV cache (the loop passes ``use_cache=False``): with a cache, transformers ignores
the position ids for masking. The first token of each example is not a target, so no example is
trained to predict across a boundary; a packed row carries exactly the loss tokens of its examples.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from trainer.data.formats import IGNORE_INDEX

Doc = dict[str, Any]  # one tokenised example: input_ids, labels, n_loss, length


class _Rooms:
    """Open bins by remaining room: the best fit (the least room that holds n) in O(log capacity)."""

    def __init__(self) -> None:
        self.values: list[int] = []  # sorted distinct rooms that have a bin
        self.bins: dict[int, list[int]] = {}

    def push(self, room: int, b: int) -> None:
        if not self.bins.get(room):
            bisect.insort(self.values, room)
            self.bins[room] = []
        self.bins[room].append(b)

    def pop_best(self, n: int) -> int | None:
        k = bisect.bisect_left(self.values, n)
        if k == len(self.values):
            return None
        room = self.values[k]
        b = self.bins[room].pop()
        if not self.bins[room]:
            del self.values[k]
        return b


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into bins of at most ``capacity`` tokens.

    Longest first (ties in the given order), each into the open bin it fills best, else a new bin.
    Deterministic; within 11/9 OPT + 1 bins (Johnson 1974), in practice a few percent of optimal.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    rooms = _Rooms()
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a row of {capacity}")
        b = rooms.pop_best(n)
        if b is None:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= n
        if room[b] > 0:
            rooms.push(room[b], b)
    return bins


def collate_padded(docs: Sequence[Doc], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest, with an attention mask."""
    width = max(len(d["input_ids"]) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, d in enumerate(docs):
        n = len(d["input_ids"])
        ids[i, :n] = torch.tensor(d["input_ids"])
        labels[i, :n] = torch.tensor(d["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(rows: Sequence[Sequence[Doc]], pad_id: int, flat: bool = False) -> dict[str, torch.Tensor]:
    """Packed rows, padded to the longest; position ids restart per example (see the module docstring).

    ``flat``: all rows as one row without padding. transformers' flash-attention path finds packed
    examples only in a batch of one row (then its variable-length kernels cost exactly the examples'
    own attention); sdpa and eager would build a dense mask over the whole row, so they get rows.
    """
    if flat:
        rows = [[d for row in rows for d in row]]
    width = max(sum(len(d["input_ids"]) for d in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d in row:
            n = len(d["input_ids"])
            ids[r, at : at + n] = torch.tensor(d["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(d["labels"][1:])  # the first token is no target
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding is a sequence of its own
    return {"input_ids": ids, "position_ids": positions, "labels": labels}
