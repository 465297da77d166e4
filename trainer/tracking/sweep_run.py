"""A sweep's MLflow parent run: created (or found again on resume) by the sweep's driver, closed with the
sweep's results. The trials' own runs are ordinary runs nested under it (``tracking.parent_run_id``).

One process, synchronous: the driver trains nothing, so there is no loop to protect from the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import TrackingConfig
from trainer.tracking.mlflow_tracker import PARENT_RUN_TAG, ensure_experiment, redact

SWEEP_TAG = "riemann_tune.sweep"  # "parent" on the sweep's run; the trial's index on each child


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_parent_run(
    cfg: TrackingConfig, name: str, params: dict[str, str], run_id: str | None = None
) -> str:
    """Create the sweep's parent run in ``cfg.experiment`` (resolved) and log ``params``; with ``run_id``
    (a resumed sweep), mark that run running again instead. Returns its id."""
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    assert cfg.uri and cfg.experiment, "resolve_tracking(cfg) first"
    client = _client(cfg.uri)
    try:
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment_id = ensure_experiment(client, cfg.uri, cfg.experiment)
        run = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: "parent"})
        new_id = str(run.info.run_id)
        client.log_batch(
            new_id, params=[Param(k, v[:6000]) for k, v in params.items()], tags=[RunTag(SWEEP_TAG, "parent")]
        )
        return new_id
    except MlflowException as e:
        raise RuntimeError(redact(f"MLflow at {cfg.uri}: cannot start the sweep's run: {e}")) from None


def finish_parent_run(
    uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path], status: str = "FINISHED"
) -> None:
    """Log the sweep's results (``metrics``, the table, plot and best config) to its run and close it."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status=status)
    except MlflowException as e:
        raise RuntimeError(redact(f"MLflow run {run_id} at {uri}: {e}")) from None


def child_runs(uri: str, parent_id: str) -> list[Any]:
    """The runs nested under ``parent_id``, in the parent's experiment."""
    client = _client(uri)
    parent = client.get_run(parent_id)
    return list(
        client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'",
            max_results=1000,
        )
    )
