"""The loop's progress display: a line per interval in a log file, a tqdm bar only on a terminal."""

from __future__ import annotations

import io

import pytest

from trainer.progress import LogProgress, NoProgress, TerminalProgress, progress

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_interval_and_the_last_step() -> None:
    """4000 steps at 10 steps/s (400 s) with a 30 s interval: 13 lines, the last one for step 4000."""
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(4000, 0, out, interval_s=30.0, clock=clock)
    for step in range(1, 4001):
        clock.now += 0.1
        bar.step(step, loss=2.5, tokens_per_s=1234.0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 14  # 400 s / 30 s = 13 intervals, then step 4000
    assert "\r" not in out.getvalue()
    assert lines[-1].startswith("train: step 4000/4000 (100%), loss 2.500, 1234 tok/s, 10.00 steps/s")
    assert lines[-1].endswith("0:06:40 elapsed, 0:00:00 left")
    assert lines[0].startswith("train: step 300/4000 (8%)")


def test_a_resumed_run_counts_its_rate_from_where_it_resumed() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(1000, 900, out, interval_s=30.0, clock=clock)
    clock.now = 50.0
    bar.step(1000, loss=1.0, tokens_per_s=1.0)
    assert "step 1000/1000" in out.getvalue() and "2.00 steps/s" in out.getvalue()


def test_the_display_follows_the_stream() -> None:
    assert isinstance(progress(10, 0, enabled=True, stream=io.StringIO()), LogProgress)
    assert isinstance(progress(10, 0, enabled=False, stream=Tty()), NoProgress)
    bar = progress(10, 0, enabled=True, stream=Tty())
    assert isinstance(bar, TerminalProgress)
    bar.close()


def test_the_terminal_bar_does_not_redraw_on_every_step() -> None:
    """tqdm's set_postfix redraws by default, whatever mininterval says: 1000 fast steps, few redraws."""
    out = Tty()
    bar = TerminalProgress(1000, 0, out)
    for step in range(1, 1001):
        bar.step(step, loss=1.0, tokens_per_s=1.0)
    bar.close()
    assert out.getvalue().count("\r") < 20
