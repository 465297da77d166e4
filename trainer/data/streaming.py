"""Global batches from a stream: the training files are read lazily and tokenised on the fly.

The order is order.py's, so a stream yields the batches the map-style path yields for the same seed
and ``shuffle_buffer``; only one window of examples is in memory. Every rank reads the whole stream and
keeps only its micro-batches (no communication, and the same batches for any worker count).

The position (``state_dict``) is the epoch, the window, the rows already taken from it and the mixer's
state at the window's start (draws so far, and each source's file and row). Resuming re-reads that one
window and skips the rows taken; earlier rows are skipped unread by tokenisation. Without a saved
position, ``for_step(k)`` replays the stream from the start to batch k (correct, slower).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

from trainer.data.batches import Layout, StepBatch, assemble
from trainer.data.formats import Encoded
from trainer.data.order import Cursor, Mixer, generator, take, window_rows
from trainer.data.packing import Doc
from trainer.data.sources import DataError, Source, stream
from trainer.data.tokenized import counts

CHUNK = 256  # raw rows tokenised per batched call


class StreamCursor:
    """One source's files, read in order and encoded in chunks; bad rows raise or are skipped."""

    def __init__(
        self,
        source: Source,
        encode: Callable[[dict[str, list[Any]]], Encoded],
        skip_bad: bool,
        bad: Counter[str] | None,
        file: int = 0,
        row: int = 0,
    ) -> None:
        self.source, self.encode, self.skip_bad, self.bad = source, encode, skip_bad, bad
        self.file, self.row = file, row  # the raw row after the last example given
        self._buffer: deque[tuple[Doc, int, int]] = deque()
        self._read: tuple[int, int] = (file, row)  # where the raw reader is
        self._rows: Iterator[dict[str, Any]] | None = None

    def _fill(self) -> None:
        while not self._buffer and self._read[0] < len(self.source.files):
            f, start = self._read
            if self._rows is None:
                self._rows = stream(self.source.files[f], skip=start)
            raw = list(itertools.islice(self._rows, CHUNK))
            if not raw:
                self._read, self._rows = (f + 1, 0), None
                continue
            self._read = (f, start + len(raw))
            keys = list(dict.fromkeys(k for r in raw for k in r))
            out = self.encode({k: [r.get(k) for r in raw] for k in keys})
            for j in range(len(raw)):
                self._keep(out, j, f, start + j)

    def _keep(self, out: Encoded, j: int, f: int, row: int) -> None:
        if out["length"][j]:
            doc = {k: out[k][j] for k in ("input_ids", "labels", "n_loss", "length")}
            self._buffer.append((doc, f, row + 1))
            if out["truncated"][j] and self.bad is not None:
                self.bad["truncated"] += 1
        elif out["bad"][j]:
            kind, message = out["bad"][j].split("\t", 1)
            if not self.skip_bad:
                path = self.source.files[f].path
                raise DataError(
                    f"{path}: row {row + 1}: {message} (data.on_bad_row=skip drops and counts bad rows)"
                )
            if self.bad is not None:
                self.bad[kind] += 1

    def next(self) -> Doc | None:
        self._fill()
        if not self._buffer:
            return None
        doc, self.file, self.row = self._buffer.popleft()
        return doc

    def restart(self) -> None:
        self.bad = None  # count each bad row once: in the first pass
        self.file = self.row = 0
        self._buffer.clear()
        self._read, self._rows = (0, 0), None

    def state(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "first_pass": self.bad is not None}


class StreamBatches:
    """Global batches of a stream; ``for_step`` is cheap in order, and seeks through ``load_state_dict``."""

    def __init__(
        self,
        sources: list[Source],
        encode: Callable[[dict[str, list[Any]]], Encoded],
        layout: Layout,
        *,
        seed: int,
        window: int,
        capacity: int | None,
        skip_bad: bool,
    ) -> None:
        self.sources, self.encode, self.layout = sources, encode, layout
        self.seed, self.window, self.capacity, self.skip_bad = seed, window, capacity, skip_bad
        self.bad: Counter[str] = Counter()
        self.info: dict[str, float] = {}
        self._saved: dict[str, Any] | None = None
        self._restore({"step": 0, "epoch": 0, "window": 0, "taken": 0, "start": None, "in_epoch": 0})

    # -- the position --------------------------------------------------------------------------------
    def _open(self, epoch: int, start: dict[str, Any] | None) -> None:
        cursors: list[Cursor[Doc]] = [
            StreamCursor(
                s, self.encode, self.skip_bad,
                self.bad if epoch == 0 and (not start or start["cursors"][i]["first_pass"]) else None,
                **({k: start["cursors"][i][k] for k in ("file", "row")} if start else {}),
            )
            for i, s in enumerate(self.sources)
        ]  # fmt: skip
        weights = [s.weight for s in self.sources]
        self.mixer = Mixer(cursors, weights, generator(self.seed, epoch, 0, "mix"), start)
        self.epoch, self.in_epoch = epoch, 0
        self.w, self.taken = -1, 0
        self.start: dict[str, Any] | None = None
        self.pending: deque[list[int]] = deque()
        self.store: dict[int, Doc] = {}

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self._open(state["epoch"], state["start"])
        self.in_epoch = state["in_epoch"]
        if state["start"] is not None:
            self.w = state["window"] - 1
            self._next_window()
            for _ in range(state["taken"]):
                self._release([self.pending.popleft()])
            self.taken = state["taken"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "window": self.w, "taken": self.taken,
            "start": self.start, "in_epoch": self.in_epoch,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = state

    # -- reading -------------------------------------------------------------------------------------
    def _next_window(self) -> bool:
        start = self.mixer.state()
        docs = take(self.mixer, self.window)
        if not docs:
            return False
        self.w, self.start, self.taken = self.w + 1, start, 0
        base = max(self.store, default=-1) + 1
        self.store.update((base + j, d) for j, d in enumerate(docs))
        rows = window_rows(
            [d["length"] for d in docs], generator(self.seed, self.epoch, self.w), self.capacity
        )
        self.pending = deque([[base + j for j in row] for row in rows])
        return True

    def _release(self, rows: list[list[int]]) -> None:
        for row in rows:
            for i in row:
                del self.store[i]

    def _take(self) -> list[list[int]]:
        """The rows of the next global batch (rolling over to the next epoch at the end of one)."""
        rows: list[list[int]] = []
        while len(rows) < self.layout.rows:
            if not self.pending and not self._next_window():
                if self.in_epoch == 0:
                    raise DataError(
                        f"the training stream has fewer rows than one global batch ({self.layout.rows})"
                    )
                self._release(rows)  # an epoch's last incomplete batch is dropped
                rows = []
                self._open(self.epoch + 1, None)
                continue
            rows.append(self.pending.popleft())
            self.taken += 1
        self.in_epoch += 1
        self.step += 1
        return rows

    def _seek(self, step: int) -> None:
        if self._saved is not None and self._saved["step"] == step:
            self._restore(self._saved)
        elif step < self.step:
            self._restore({"step": 0, "epoch": 0, "window": 0, "taken": 0, "start": None, "in_epoch": 0})
        while self.step < step:
            self._release(self._take())

    def for_step(self, step: int) -> StepBatch:
        if step != self.step:
            self._seek(step)
        rows = self._take()
        batch = assemble(rows, self, self.layout, self.epoch)
        self._release(rows)
        batch.metrics.update(counts(self.bad, "data/"))
        return batch

    def length(self, i: int) -> int:
        return int(self.store[i]["length"])

    def n_loss(self, i: int) -> int:
        return int(self.store[i]["n_loss"])

    def doc(self, i: int) -> Doc:
        return self.store[i]

    def stats(self) -> dict[str, float]:
        """Bad rows skipped and examples truncated so far (each once, in the first pass of epoch 0)."""
        return self.info | counts(self.bad, "data/")
