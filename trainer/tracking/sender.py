"""A background sender: the training loop hands work over and never waits on the tracking server.

Metric rows go into a bounded queue (beyond ``capacity`` the oldest row is dropped and counted); other
work (tags, artefacts, closing the run) goes into a small ordered queue that is never trimmed. One
thread first runs ``connect`` (create or resume the run), then delivers rows in batches and tasks in
order. A transient failure is retried with exponential backoff (0.5 s doubling up to ``retry_max_s``);
a permanent one (``is_permanent``) drops that item and says so. Nothing here knows about MLflow.

Accounting is exact: every row submitted ends up counted once, as ``sent`` or ``dropped``. A row in a
request that was interrupted by ``give_up`` is only counted once the request has ended.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Row = tuple[int, dict[str, float], int]
"""(step, metrics, timestamp in ms): one ``log_metrics`` call."""


@dataclass
class Task:
    """One piece of non-metric work, run in submission order after the connection is made."""

    name: str
    run: Callable[[], object]


@dataclass
class SenderReport:
    """What happened to everything that was submitted."""

    connected: bool
    rows_sent: int
    rows_dropped: int
    tasks_failed: list[str] = field(default_factory=list)
    last_error: str | None = None


class Sender:
    """Delivers metric rows and tasks to a tracking server from one daemon thread.

    ``connect`` runs first and is retried like everything else; ``send_rows`` receives a batch of rows
    (at most ``batch_values`` metric values, but always at least one row); ``on_recover`` runs after
    the first success that follows a failure (e.g. to restart a monitor that died in the outage).
    """

    def __init__(
        self,
        connect: Callable[[], None],
        send_rows: Callable[[list[Row]], None],
        *,
        capacity: int,
        retry_max_s: float,
        is_permanent: Callable[[BaseException], bool] = lambda e: False,
        describe: Callable[[BaseException], str] = str,
        on_recover: Callable[[], None] = lambda: None,
        batch_values: int = 1000,
        name: str = "tracking",
    ) -> None:
        self.name = name
        self._connect, self._send_rows = connect, send_rows
        self._is_permanent, self._describe, self._on_recover = is_permanent, describe, on_recover
        self.capacity, self.retry_max_s, self.batch_values = capacity, retry_max_s, batch_values
        self._rows: collections.deque[Row] = collections.deque()
        self._tasks: collections.deque[Task] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False  # an item is out of the queues, being attempted
        self._busy_rows = 0  # rows in that item
        self._busy_task: str | None = None  # or the task's name
        self._connected = False
        self._dead = False  # connecting failed for good, or given up: everything is dropped from now on
        self._stopping = False
        self._failing = False
        self._sent = self._dropped = 0
        self._failed_tasks: list[str] = []
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._main, name="tracking-sender", daemon=True)
        self._thread.start()

    # -- the producer side (the training loop): never blocks beyond a lock ---------------------------

    def submit_rows(self, row: Row) -> None:
        with self._cv:
            if self._dead:
                self._dropped += 1
                return
            self._rows.append(row)
            if len(self._rows) > self.capacity:
                self._rows.popleft()  # the latest state matters most to someone watching the run
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.warning("%s: queue full (%d rows): %d oldest rows dropped so far",
                                self.name, self.capacity, self._dropped)  # fmt: skip
            self._cv.notify()

    def submit(self, task: Task) -> None:
        with self._cv:
            if self._dead:
                self._failed_tasks.append(task.name)
                return
            self._tasks.append(task)
            self._cv.notify()

    # -- the closing side ------------------------------------------------------------------------------

    def wait_idle(self, deadline: float) -> bool:
        """Wait (until ``time.monotonic()`` reaches ``deadline``) for every queued item to be delivered."""
        with self._cv:
            while not self._idle():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(remaining)
            return True

    def give_up(self, grace_s: float) -> None:
        """Drop everything still queued (counted) and anything submitted later; wait up to ``grace_s``
        for a request in flight to end, so that what it carried is counted where it went."""
        with self._cv:
            self._dead = True
            self._drop_queued()
            self._cv.notify_all()
            end = time.monotonic() + grace_s
            while self._busy and time.monotonic() < end:
                self._cv.wait(max(0.0, end - time.monotonic()))

    def stop(self, deadline: float, grace_s: float) -> SenderReport:
        """Deliver what is queued until ``deadline``, give up on the rest, stop the thread; the report."""
        if not self.wait_idle(deadline):
            self.give_up(grace_s)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(grace_s)
        return self.report()

    def report(self) -> SenderReport:
        with self._cv:
            pending = len(self._rows) + (self._busy_rows if self._busy else 0)
            unfinished = [t.name for t in self._tasks] + ([self._busy_task] if self._busy_task else [])
            return SenderReport(
                connected=self._connected,
                rows_sent=self._sent,
                rows_dropped=self._dropped + pending,  # still queued or unconfirmed: not delivered
                tasks_failed=self._failed_tasks + unfinished,
                last_error=self._last_error,
            )

    # -- the thread ------------------------------------------------------------------------------------

    def _idle(self) -> bool:
        return self._dead or (self._connected and not self._rows and not self._tasks and not self._busy)

    def _drop_queued(self) -> None:
        self._dropped += len(self._rows)
        self._rows.clear()
        self._failed_tasks.extend(t.name for t in self._tasks)
        self._tasks.clear()

    def _main(self) -> None:
        with self._cv:
            self._busy = True  # give_up waits for a connection attempt too: it may create the run
        connected = self._attempt_until_done("connect", self._connect)
        with self._cv:
            self._connected, self._busy = connected, False
            if not connected:
                self._dead = True
                self._drop_queued()
            self._cv.notify_all()
        while (item := self._next()) is not None:
            if isinstance(item, Task):
                ok = self._attempt_until_done(item.name, item.run)
            else:
                ok = self._attempt_until_done("metrics", functools.partial(self._send_rows, item))
            with self._cv:  # one critical section: report() never sees the item both busy and counted
                if isinstance(item, Task) and not ok:
                    self._failed_tasks.append(item.name)
                elif not isinstance(item, Task):
                    self._sent += len(item) if ok else 0
                    self._dropped += 0 if ok else len(item)
                self._busy, self._busy_rows, self._busy_task = False, 0, None
                self._cv.notify_all()

    def _next(self) -> list[Row] | Task | None:
        """The next batch of rows (rows first: they are what a user watches), else the next task."""
        with self._cv:
            while not (self._rows or self._tasks):
                if self._stopping or self._dead:
                    return None
                self._cv.wait()
            self._busy = True
            if self._rows:
                batch: list[Row] = []
                values = 0
                while self._rows and (not batch or values + len(self._rows[0][1]) <= self.batch_values):
                    batch.append(self._rows.popleft())
                    values += len(batch[-1][1])
                self._busy_rows = len(batch)
                return batch
            self._busy_rows = 0
            task = self._tasks.popleft()
            self._busy_task = task.name
            return task

    def _attempt_until_done(self, what: str, fn: Callable[[], Any]) -> bool:
        """Call ``fn`` until it succeeds (True), fails permanently or the sender gives up (False)."""
        backoff = min(0.5, self.retry_max_s)
        while True:
            try:
                fn()
            except Exception as e:
                message = self._describe(e)
                with self._cv:
                    self._last_error = message
                if self._is_permanent(e):
                    log.warning("%s: %s failed and will not be retried: %s", self.name, what, message)
                    return False
                if not self._failing:
                    log.warning("%s: %s failed (%s); training goes on, retrying in the background",
                                self.name, what, message)  # fmt: skip
                self._failing = True
                with self._cv:
                    if self._cv.wait_for(lambda: self._dead, timeout=backoff):
                        return False
                backoff = min(2 * backoff, self.retry_max_s)
                continue
            if self._failing:
                self._failing = False
                log.warning("%s: reachable again; sending what was queued", self.name)
                try:
                    self._on_recover()
                except Exception as e:
                    log.warning("%s: after the outage: %s", self.name, self._describe(e))
            return True
