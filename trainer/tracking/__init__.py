"""What a run logs, and where: the only package of the trainer that imports mlflow.

- ``base``: the Tracker protocol the loop sees, the null tracker, and metrics.jsonl (no server);
- ``mlflow_tracker``: the MLflow tracker, its configuration, and what a run logs (rank 0 only);
- ``sender``: the background sender (bounded queue, retries, exact drop counts), so the server is
  never the reason a run dies or waits;
- ``provenance``: the run's tags (job ids, hardware, commit, versions);
- ``loss_curve``: the loss curve PNG drawn from metrics.jsonl;
- ``rank_stats``: per-rank measurements (peak memory) gathered to rank 0;
- ``posthoc``: results computed after the run (an evaluation) logged to it, or to a child run.

mlflow itself is imported inside the functions that use it, so importing this package is cheap.
"""

from trainer.tracking.base import MetricsFile, NullTracker, Tracker
from trainer.tracking.loss_curve import plot_loss_curve, read_rows
from trainer.tracking.mlflow_tracker import (
    MlflowTracker,
    adapter_artifacts,
    describe_error,
    is_permanent,
    log_outputs,
    make_tracker,
    prepare_local_store,
    redact,
    resolve_run,
    resolve_tracking,
    start_tracking,
)
from trainer.tracking.posthoc import log_to_run
from trainer.tracking.provenance import cpu_model, git_tags, hardware, run_tags
from trainer.tracking.rank_stats import gather_to_rank0, memory_metrics, peak_memory_mb, peak_reserved_mb
from trainer.tracking.sender import Row, Sender, SenderReport, Task

__all__ = [
    "MetricsFile",
    "MlflowTracker",
    "NullTracker",
    "Row",
    "Sender",
    "SenderReport",
    "Task",
    "Tracker",
    "adapter_artifacts",
    "cpu_model",
    "describe_error",
    "gather_to_rank0",
    "git_tags",
    "hardware",
    "is_permanent",
    "log_outputs",
    "log_to_run",
    "make_tracker",
    "memory_metrics",
    "peak_memory_mb",
    "peak_reserved_mb",
    "plot_loss_curve",
    "prepare_local_store",
    "read_rows",
    "redact",
    "resolve_run",
    "resolve_tracking",
    "run_tags",
    "start_tracking",
]
