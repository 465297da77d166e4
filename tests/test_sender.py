"""The background sender (trainer/tracking/sender.py), a plain callable standing in for the server."""

from __future__ import annotations

import threading
import time

import pytest

from trainer.tracking import Row, Sender, Task

pytestmark = pytest.mark.unit


def _row(step: int) -> Row:
    return (step, {"loss": 1.0 / (step + 1), "lr": 0.1}, 1000 + step)


class FlakyServer:
    """A stand-in server (a plain callable, not a mock of MLflow): down while ``down`` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.received: list[Row] = []
        self.calls = 0

    def send(self, rows: list[Row]) -> None:
        self.calls += 1
        if self.down.is_set():
            raise ConnectionError("connection refused")
        self.received.extend(rows)


def test_rows_queued_during_an_outage_arrive_once_in_order_after_it() -> None:
    server = FlakyServer()
    server.down.set()
    sender = Sender(lambda: None, server.send, capacity=1000, retry_max_s=0.05)
    for step in range(50):
        sender.submit_rows(_row(step))
    time.sleep(0.3)
    assert server.received == [] and server.calls > 1, "retried while down"
    server.down.clear()
    assert sender.wait_idle(time.monotonic() + 10)
    assert [r[0] for r in server.received] == list(range(50))
    report = sender.stop(time.monotonic() + 1, grace_s=1)
    assert (report.rows_sent, report.rows_dropped, report.connected) == (50, 0, True)


def test_a_full_queue_drops_the_oldest_rows_and_counts_them_exactly() -> None:
    server = FlakyServer()
    server.down.set()
    sender = Sender(lambda: None, server.send, capacity=10, retry_max_s=0.05)
    sender.submit_rows(_row(0))
    while server.calls == 0:  # row 0 is out of the queue, in a request that fails and is retried
        time.sleep(0.01)
    for step in range(1, 25):
        sender.submit_rows(_row(step))
    server.down.clear()
    report = sender.stop(time.monotonic() + 10, grace_s=1)
    delivered = [r[0] for r in server.received]
    assert delivered == [0, *range(15, 25)], "the row in flight, then the newest `capacity` rows"
    assert (report.rows_sent, report.rows_dropped) == (11, 14)


def test_the_training_loop_never_waits_on_a_hung_server() -> None:
    """The server hangs on every request: 2000 submissions still return at once."""
    hang = threading.Event()
    sender = Sender(lambda: None, lambda rows: hang.wait(), capacity=100_000, retry_max_s=0.05)
    start = time.perf_counter()
    for step in range(2000):
        sender.submit_rows(_row(step))
    elapsed = time.perf_counter() - start
    hang.set()
    sender.stop(time.monotonic() + 10, grace_s=1)
    assert elapsed < 1.0, f"2000 submissions took {elapsed:.3f} s"


def test_a_server_never_reached_drops_everything_and_says_so() -> None:
    def refuse() -> None:
        raise ConnectionError("refused")

    sender = Sender(refuse, FlakyServer().send, capacity=100, retry_max_s=0.05)
    for step in range(7):
        sender.submit_rows(_row(step))
    sender.submit(Task("artefact x", lambda: None))
    report = sender.stop(time.monotonic() + 0.3, grace_s=1)
    assert not report.connected
    assert (report.rows_sent, report.rows_dropped) == (0, 7)
    assert report.tasks_failed == ["artefact x"] and "refused" in str(report.last_error)


def test_a_rejected_batch_is_dropped_not_retried_and_the_rest_goes_on() -> None:
    received: list[int] = []
    calls = 0

    def send(rows: list[Row]) -> None:
        nonlocal calls
        calls += 1
        if rows[0][0] == 3:
            raise ValueError("rejected")
        received.extend(r[0] for r in rows)

    sender = Sender(lambda: None, send, capacity=100, retry_max_s=0.05, batch_values=2,
                    is_permanent=lambda e: isinstance(e, ValueError))  # fmt: skip
    for step in range(6):
        sender.submit_rows(_row(step))
    report = sender.stop(time.monotonic() + 10, grace_s=1)
    assert received == [0, 1, 2, 4, 5] and calls == 6
    assert (report.rows_sent, report.rows_dropped) == (5, 1)
