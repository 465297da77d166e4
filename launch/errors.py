"""What a user gets wrong ends a command with one line that names it, and exit code 2.

A bad config, data row, model path, checkpoint or adapter raises one of ``USAGE_ERRORS``, in this
process or in a worker: Ray hands a worker's exception back wrapped (``ray.train.WorkerGroupError``
holds each rank's), and a local worker process that printed its own error exits with code 2.
"""

from __future__ import annotations

from trainer.config import ConfigError
from trainer.errors import DataError, InferenceError, MergeError

USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, FileNotFoundError, DataError, InferenceError, MergeError,
)  # fmt: skip

USAGE_EXIT = 2


class ReportedError(Exception):
    """A worker process already printed the user's error and exited with ``USAGE_EXIT``."""


def usage_error(exc: BaseException) -> BaseException | None:
    """The user's error behind ``exc``: itself, or a worker's that Ray wrapped (the lowest rank's)."""
    if isinstance(exc, USAGE_ERRORS):
        return exc
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            found = usage_error(failures[rank])
            if found is not None:
                return found
    return usage_error(exc.__cause__) if exc.__cause__ is not None else None
