"""The Tracker protocol and the trackers that need no server: NullTracker and MetricsFile.

trainer/tracking/mlflow_tracker.py adds the MLflow one; the training loop sees only the protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from trainer.checkpoints import atomic_write_text

TABLES = ("samples",)
"""The tables a run logs (``samples``: trainer/inference/samples.py), each a ``<name>.jsonl`` locally."""


class Tracker(Protocol):
    """Where a run's params, tags, metrics and artefacts go. Implementations must not block the loop.

    ``flush`` delivers what is queued (bounded in time) and returns the tracking part of the run's
    summary (run id, URI, metric rows delivered / dropped); ``finish`` closes the run.
    """

    @property
    def run_id(self) -> str | None: ...
    @property
    def uri(self) -> str | None: ...

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Append ``rows`` (one dict per row, the same keys) to the run's table ``name``."""
        ...

    def register_model(self, name: str, artifact_path: str) -> None: ...
    def backfill(self, rows: list[tuple[int, dict[str, float]]]) -> None: ...
    def flush(self) -> dict[str, Any]: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing (ranks other than 0, or tracking disabled)."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        pass

    def register_model(self, name: str, artifact_path: str) -> None:
        pass

    def backfill(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        pass

    def flush(self) -> dict[str, Any]:
        return {}

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MetricsFile:
    """Forwards to another tracker and appends every metrics row to a local jsonl file first, and every
    table's rows to ``<table>.jsonl`` beside it.

    The files are the run's own record: they exist whatever happens to the tracking server.
    """

    def __init__(self, path: Path, inner: Tracker, resumed_at: int | None = None) -> None:
        self.path = path
        self.inner = inner
        path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is None:  # a fresh run in a used directory: its records are this run's alone
            self._start_over()
        elif path.exists():
            self._resume_at(resumed_at)
        self._file = path.open("a")

    def _start_over(self) -> None:
        """The files of a run that trained here before go (its MLflow run keeps them): appended to, the
        new run's summary would read the old run's samples as its own."""
        for file in (self.path, *(self.path.parent / f"{name}.jsonl" for name in TABLES)):
            file.unlink(missing_ok=True)

    def _resume_at(self, step: int) -> None:
        """A run resumed from its checkpoint at ``step``: rows of later steps (the cut-short attempt's,
        which the resumed run replays) leave the file, and the rows up to ``step`` are offered to the
        inner tracker, which sends those its server lacks (a killed worker never flushed its queue)."""
        kept = _rows_up_to(self.path, step)
        for name in TABLES:  # a table's rows of replayed steps go too (the replay logs them again)
            if (self.path.parent / f"{name}.jsonl").is_file():
                _rows_up_to(self.path.parent / f"{name}.jsonl", step)
        self.inner.backfill([(row.pop("step"), row) for row in kept])

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    @property
    def uri(self) -> str | None:
        return self.inner.uri

    def log_params(self, params: dict[str, str]) -> None:
        self.inner.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.inner.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        self.inner.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        assert name in TABLES, f"add {name!r} to TABLES, so that a resumed run trims it"
        with (self.path.parent / f"{name}.jsonl").open("a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        self.inner.log_table(rows, name)

    def register_model(self, name: str, artifact_path: str) -> None:
        self.inner.register_model(name, artifact_path)

    def backfill(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.inner.backfill(rows)

    def flush(self) -> dict[str, Any]:
        return self.inner.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self._file.close()
        self.inner.finish(status)


def _rows_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep only the rows of ``path`` (jsonl, each with an int ``step``) up to ``step``; returns them."""
    kept: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed writer
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(row)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept
