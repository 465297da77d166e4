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
