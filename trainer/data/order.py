"""The order of an epoch: sources mixed by weight, shuffled (and packed) window by window.

One definition serves the map-style and the streaming path, so both yield the same rows:

1. Mix: while some source has not run out in this epoch, draw a source with probability weight / sum
   of weights (a seeded generator per epoch, in blocks of ``_BLOCK`` draws) and take its next example;
   a source that runs out starts again (datasets' ``all_exhausted`` interleaving: every example is seen
   at least once per epoch, a heavy small source is repeated). One source is read in its file order.
2. Window: the mixed examples are cut into consecutive windows of ``data.shuffle_buffer`` examples
   (the whole epoch when it is null).
3. Shuffle and pack each window with its own generator (seed, epoch, window): a random permutation;
   with packing, best-fit-decreasing bins over the permuted examples, then a random order of the bins.
   Without packing each example is a row.

Everything depends only on the seed, the epoch and the data, never on the worker count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch

from trainer.data.packing import pack

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
_BLOCK = 1024


def generator(seed: int, epoch: int, window: int = 0, purpose: str = "order") -> torch.Generator:
    """The seeded generator of one purpose (order, mix, eval) in one window of one epoch."""
    if purpose == "order" and window == 0:
        value = seed * 100_003 + epoch  # the first window keeps the skeleton's order (its golden losses)
    else:
        digest = hashlib.sha256(f"{purpose}:{seed}:{epoch}:{window}".encode()).digest()
        value = int.from_bytes(digest[:8], "little")
    return torch.Generator().manual_seed(value)


class Cursor(Protocol[T_co]):
    """A source read in passes: ``next`` gives its next example, None at the end of a pass."""

    def next(self) -> T_co | None: ...
    def restart(self) -> None: ...
    def state(self) -> dict[str, Any]: ...


class IndexCursor:
    """A map-style source: the ids of its examples, in order."""

    def __init__(self, ids: Sequence[int], at: int = 0) -> None:
        self.ids, self.at = ids, at

    def next(self) -> int | None:
        if self.at == len(self.ids):
            return None
        self.at += 1
        return self.ids[self.at - 1]

    def restart(self) -> None:
        self.at = 0

    def state(self) -> dict[str, Any]:
        return {"at": self.at}


class Mixer(Generic[T]):
    """Step 1 of the module docstring over cursors; ``state`` and ``draws`` resume it exactly."""

    def __init__(
        self,
        cursors: list[Cursor[T]],
        weights: Sequence[float],
        gen: torch.Generator,
        state: dict | None = None,
    ) -> None:
        self.cursors, self.gen = cursors, gen
        self.p = torch.tensor(weights, dtype=torch.float64)
        self.done = list(state["done"]) if state else [False] * len(cursors)
        self.draws = 0
        self.block: list[int] = []
        for _ in range(state["draws"] if state else 0):  # replay the draws (cheap) to reach the same point
            self._draw()

    def _draw(self) -> int:
        if self.draws % _BLOCK == 0:
            self.block = torch.multinomial(self.p, _BLOCK, replacement=True, generator=self.gen).tolist()
        self.draws += 1
        return self.block[(self.draws - 1) % _BLOCK]

    def next(self) -> T | None:
        if all(self.done):
            return None
        if len(self.cursors) == 1:  # no draws: one source is read in order
            item = self.cursors[0].next()
            self.done[0] = item is None
            return item
        i = self._draw()
        item = self.cursors[i].next()
        if item is None:
            self.done[i] = True
            if all(self.done):
                return None
            self.cursors[i].restart()
            item = self.cursors[i].next()
            if item is None:
                raise ValueError(f"data source {i} has no examples")
        return item

    def state(self) -> dict[str, Any]:
        return {"draws": self.draws, "done": list(self.done), "cursors": [c.state() for c in self.cursors]}


def take(mixer: Mixer[T], n: int | None) -> list[T]:
    """The next ``n`` examples (all that are left when None or fewer remain)."""
    out: list[T] = []
    while n is None or len(out) < n:
        item = mixer.next()
        if item is None:
            break
        out.append(item)
    return out


def window_rows(lengths: Sequence[int], gen: torch.Generator, capacity: int | None) -> list[list[int]]:
    """Step 3 of the module docstring: rows of positions into one window's examples."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    if capacity is None:
        return [[i] for i in perm]
    bins = [[perm[j] for j in b] for b in pack([lengths[i] for i in perm], capacity)]
    return [bins[k] for k in torch.randperm(len(bins), generator=gen).tolist()]


def epoch_rows(
    mixer: Mixer[int],
    length: Callable[[int], int],
    seed: int,
    epoch: int,
    window: int | None,
    capacity: int | None,
) -> Iterator[list[int]]:
    """Every row of one epoch, as example ids (the map-style path; streaming does the same lazily)."""
    w = 0
    while ids := take(mixer, window):
        rows = window_rows([length(i) for i in ids], generator(seed, epoch, w), capacity)
        yield from ([ids[j] for j in row] for row in rows)
        w += 1
