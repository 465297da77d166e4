"""The training loop's progress display: a live bar on a terminal, a line per interval in a log.

A tqdm bar redraws itself with a carriage return; written to a file (a Ray or Slurm log) every redraw
stays, so a days-long run would leave one bar per step there. Off a terminal the loop gets
``LogProgress`` instead: one plain line every ``interval_s`` seconds, and one for the last step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from tqdm.auto import tqdm


class Progress(Protocol):
    def step(self, step: int, loss: float, tokens_per_s: float) -> None: ...
    def close(self) -> None: ...


class TerminalProgress:
    """A tqdm bar (redrawn at most every 0.5 s) with the last loss and throughput."""

    def __init__(self, total: int, initial: int, stream: TextIO) -> None:
        self._bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", file=stream, mininterval=0.5
        )

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        # refresh=False: the postfix shows at the bar's next redraw, not as an extra one per step.
        self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


class LogProgress:
    """One line per ``interval_s`` (and for the last step): step, loss, throughput, rate and time left."""

    def __init__(
        self,
        total: int,
        initial: int,
        stream: TextIO,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.stream, self.interval_s, self.clock = total, stream, interval_s, clock
        self._start_step, self._start = initial, clock()
        self._last = self._start

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = self.clock()
        if now - self._last < self.interval_s and step < self.total:
            return
        self._last = now
        rate = (step - self._start_step) / max(now - self._start, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        # write(), not print(): Ray Train copies printed lines into its own log, so each would show twice.
        self.stream.write(
            f"train: step {step}/{self.total} ({100 * step / max(1, self.total):.0f}%), loss {loss:.3f}, "
            f"{tokens_per_s:.0f} tok/s, {rate:.2f} steps/s, {_duration(now - self._start)} elapsed, "
            f"{_duration(left)} left\n"
        )
        self.stream.flush()

    def close(self) -> None:
        pass


class NoProgress:
    """Ranks other than 0 show nothing."""

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int, enabled: bool, stream: TextIO | None = None) -> Progress:
    """The display for this process: a bar on a terminal, lines in a log, nothing if not ``enabled``."""
    stream = stream or sys.stderr
    if not enabled:
        return NoProgress()
    if stream.isatty():
        return TerminalProgress(total, initial, stream)
    return LogProgress(total, initial, stream)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
