"""Global batches: rows of an epoch cut into steps, each step's rows dealt out to ranks.

Global batch k is rows ``[k * G, (k + 1) * G)`` of its epoch (G = micro x accumulation x world rows; an
epoch's last incomplete batch is dropped). It is cut into ``world * accum`` micro-batches; rank r takes
micro-batch ``j * world + r`` at accumulation step j. Every rank knows every row's tokens and loss
tokens, so each computes the global batch's loss-token count alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import datasets
import torch

from trainer.data.formats import IGNORE_INDEX
from trainer.data.order import IndexCursor, Mixer, epoch_rows, generator
from trainer.data.packing import Doc, collate_packed, collate_padded
from trainer.data.sources import DataError
from trainer.data.tokenized import column


@dataclass(frozen=True)
class StepBatch:
    """What one rank trains on in one optimizer step."""

    micro_batches: list[dict[str, torch.Tensor]]
    global_loss_tokens: int  # loss tokens of the whole global batch (all ranks, all micro-batches)
    global_tokens: int  # non-pad input tokens of the whole global batch
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)  # logged with the step (e.g. packing efficiency)


class GlobalBatches(Protocol):
    """The training data of one rank: ``for_step(k)`` is global batch k's share, for any k.

    ``state_dict`` is the position after the last batch given (the next step's); a checkpoint stores
    it and a resumed run calls ``load_state_dict`` before ``for_step(step)`` (the step alone is enough
    too: map-style batches are random access, a stream replays up to it).
    """

    info: dict[str, float]  # fixed facts about the data (sizes, bad rows skipped), reported by stats()

    def for_step(self, step: int) -> StepBatch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def stats(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class Layout:
    """How a global batch is cut: rows per micro-batch, accumulation steps, ranks, this rank."""

    micro: int
    accum: int
    world: int
    rank: int
    pad_id: int
    packed: bool
    flat: bool = False  # packed micro-batches as one row without padding (flash-attention)

    @property
    def rows(self) -> int:
        return self.micro * self.accum * self.world

    def chunks(self) -> list[slice]:
        """Every micro-batch of the global batch, in row order."""
        return [slice(c * self.micro, (c + 1) * self.micro) for c in range(self.accum * self.world)]

    def mine(self) -> list[slice]:
        """This rank's micro-batches, in accumulation order."""
        every = self.chunks()
        return [every[j * self.world + self.rank] for j in range(self.accum)]


class DocStore(Protocol):
    def length(self, i: int) -> int: ...
    def n_loss(self, i: int) -> int: ...
    def doc(self, i: int) -> Doc: ...


def assemble(rows: Sequence[Sequence[int]], store: DocStore, layout: Layout, epoch: int) -> StepBatch:
    """This rank's micro-batches of one global batch, its loss tokens and its packing efficiency.

    Packing efficiency = real tokens / slots, where slots are the positions the model computes: each
    micro-batch's rows times its padded width. Without packing it measures the padding.
    """
    lengths = [sum(store.length(i) for i in row) for row in rows]
    if layout.flat:
        slots = sum(lengths)
    else:
        slots = sum((c.stop - c.start) * max(lengths[c]) for c in layout.chunks())
    micro = []
    for c in layout.mine():
        docs = [[store.doc(i) for i in row] for row in rows[c]]
        if layout.packed:
            micro.append(collate_packed(docs, layout.pad_id, layout.flat))
        else:
            micro.append(collate_padded([d for (d,) in docs], layout.pad_id))
    return StepBatch(
        micro_batches=micro,
        global_loss_tokens=sum(store.n_loss(i) for row in rows for i in row),
        global_tokens=sum(lengths),
        epoch=epoch,
        metrics={"train/packing_efficiency": sum(lengths) / slots},
    )


class DatasetStore:
    """Tokenised examples of a map-style data set, by index."""

    def __init__(self, data: datasets.Dataset) -> None:
        self.data = data
        self.lengths = column(data, "length").tolist()
        self.losses = column(data, "n_loss").tolist()

    def length(self, i: int) -> int:
        return self.lengths[i]

    def n_loss(self, i: int) -> int:
        return self.losses[i]

    def doc(self, i: int) -> Doc:
        return self.data[i]


class MapBatches:
    """Global batches of a tokenised data set in memory-mapped Arrow: any step, in any order."""

    def __init__(
        self,
        data: datasets.Dataset,
        sources: Sequence[Sequence[int]],
        weights: Sequence[float],
        layout: Layout,
        *,
        seed: int,
        window: int | None,
        capacity: int | None,
    ) -> None:
        self.store, self.sources, self.weights, self.layout = DatasetStore(data), sources, weights, layout
        self.seed, self.window, self.capacity = seed, window, capacity
        self.info: dict[str, float] = {}
        self._rows: tuple[int, list[list[int]]] | None = None
        self._steps: list[int] = []  # steps of each epoch computed so far
        self._next = 0
        if self.steps_in(0) == 0:
            raise DataError(
                f"{len(self.epoch_rows(0))} training rows are fewer than one global batch ({layout.rows})"
            )

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._rows is None or self._rows[0] != epoch:
            mixer = Mixer(
                [IndexCursor(s) for s in self.sources], self.weights, generator(self.seed, epoch, 0, "mix")
            )
            rows = epoch_rows(mixer, self.store.length, self.seed, epoch, self.window, self.capacity)
            self._rows = (epoch, list(rows))
        return self._rows[1]

    def steps_in(self, epoch: int) -> int:
        while len(self._steps) <= epoch:
            self._steps.append(len(self.epoch_rows(len(self._steps))) // self.layout.rows)
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global step ``step``."""
        epoch = 0
        while step >= self.steps_in(epoch):
            step -= self.steps_in(epoch)
            epoch += 1
        return epoch, step

    def global_rows(self, step: int) -> list[list[int]]:
        """Example ids of every row of global batch ``step`` (the same on every rank)."""
        epoch, b = self.locate(step)
        return self.epoch_rows(epoch)[b * self.layout.rows : (b + 1) * self.layout.rows]

    def for_step(self, step: int) -> StepBatch:
        self._next = step + 1
        return assemble(self.global_rows(step), self.store, self.layout, self.locate(step)[0])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next = int(state["step"])

    def stats(self) -> dict[str, float]:
        return dict(self.info)


def eval_batches(
    data: datasets.Dataset,
    micro_batch_size: int,
    world_size: int,
    rank: int,
    pad_id: int,
    max_batches: int | None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the eval set (rows rank, rank + W, ...), in micro-batches.

    Every rank gets the same number of micro-batches (ZeRO-3 gathers parameters collectively in each
    forward): a rank that runs out of rows gets a filler batch whose labels carry no loss.
    """
    rows = list(range(rank, len(data), world_size))
    n_batches = math.ceil(math.ceil(len(data) / world_size) / micro_batch_size)  # the same on every rank
    if max_batches:
        n_batches = min(n_batches, max_batches)
    batches = []
    for b in range(n_batches):
        chunk = rows[b * micro_batch_size : (b + 1) * micro_batch_size]
        if chunk:
            batches.append(collate_padded([data[i] for i in chunk], pad_id))
        else:
            filler = collate_padded([data[0]], pad_id)
            filler["labels"].fill_(IGNORE_INDEX)
            batches.append(filler)
    return batches
