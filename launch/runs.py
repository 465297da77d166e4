"""``python -m launch runs``: the recent MLflow runs as one table, to compare them from a terminal.

Besides the trainer/tracking/ package, the only module that imports mlflow.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO_STORE = "sqlite:///runs/mlflow.db"  # where `make demo` logs (relative to the current directory)
KEY_PARAMS = {
    "method": "adapter.method",
    "rank": "adapter.rank",
    "optim": "optim.name",
    "precond": "optim.preconditioner",
    "lr": "optim.lr",
    "workers": "distributed.num_workers",
}
COLUMNS = ["name", "run id", "status", "start", "steps", "loss", "eval loss", "tokens/s", *KEY_PARAMS]


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEMO_STORE


def recent_runs(uri: str, experiment: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The ``limit`` most recent runs (of ``experiment``, or of every experiment), newest first, as rows.

    Steps and tokens/s come from the metric histories (three requests per run); loss and eval loss
    are the values at the last step.
    """
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite stores announce their migrations
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"{uri}: no MLflow store there (pass --uri or set MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri=uri)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise FileNotFoundError(f"{uri}: no experiment named {experiment!r}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=limit)
    return [_row(client, run) for run in runs]


def _row(client: Any, run: Any) -> dict[str, Any]:
    run_id, metrics, params = run.info.run_id, run.data.metrics, run.data.params
    losses = client.get_metric_history(run_id, "train/loss")
    speeds = {m.step: m.value for m in client.get_metric_history(run_id, "train/tokens_per_s")}
    times = {m.step: m.value for m in client.get_metric_history(run_id, "train/step_time_s")}
    steps = speeds.keys() & times.keys()
    seconds = sum(times[s] for s in steps)
    return {
        "name": run.info.run_name,
        "run id": run_id,
        "status": run.info.status,
        "start": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)),
        "steps": max(m.step for m in losses) if losses else None,
        "loss": metrics.get("train/loss"),
        "eval loss": metrics.get("eval/loss"),
        # tokens over seconds (not a mean of per-step rates): what the run's summary reports
        "tokens/s": sum(speeds[s] * times[s] for s in steps) / seconds if seconds else None,
        **{column: params.get(key) for column, key in KEY_PARAMS.items()},
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def print_runs(uri: str | None, experiment: str | None, limit: int) -> int:
    uri = uri or default_uri()
    rows = recent_runs(uri, experiment, limit)
    if not rows:
        print(f"no runs at {uri}" + (f" in experiment {experiment!r}" if experiment else ""))
        return 0
    print(format_table(rows))
    return 0


SWEEP_COLUMNS = ["trial", "run id", "status", "steps", "loss", "eval loss", "tokens/s"]


def sweep_rows(uri: str, parent_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    """A sweep's trials (the runs nested under ``parent_id``), by name, with the swept params as columns."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from trainer.tracking.sweep_run import child_runs

    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise FileNotFoundError(f"{uri}: no run {parent_id} (the sweep's parent run id)") from None
    swept = sorted(k.removeprefix("sweep.grid.") for k in parent.data.params if k.startswith("sweep.grid."))
    rows = []
    for run in sorted(child_runs(uri, parent_id), key=lambda r: r.info.run_name or ""):
        row = _row(client, run)
        row["trial"] = (row.pop("name") or "").rsplit("/", 1)[-1]
        rows.append(row | {key: run.data.params.get(key) for key in swept})
    return swept, rows


def print_sweep(uri: str | None, parent_id: str) -> int:
    uri = uri or default_uri()
    swept, rows = sweep_rows(uri, parent_id)
    if not rows:
        print(f"no trials under run {parent_id} at {uri}")
        return 0
    print(format_table(rows, [*SWEEP_COLUMNS[:1], *swept, *SWEEP_COLUMNS[1:]]))
    return 0
