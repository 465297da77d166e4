"""Logging after the run: results computed later (an evaluation) added to the run's own MLflow run, or to
a nested child run of it. One process, synchronous: there is no training loop here to protect."""

from __future__ import annotations

from pathlib import Path

from trainer.tracking.mlflow_tracker import redact

PARENT_TAG = "mlflow.parentRunId"


def log_to_run(
    uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path], child: str | None = None
) -> str:
    """Log ``metrics`` and ``artifacts`` to run ``run_id`` at ``uri``, or to a new child run of it named
    ``child``; returns the id of the run logged to. Errors name the run, with credentials redacted."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        target = run_id
        if child is not None:
            parent = client.get_run(run_id)
            target = client.create_run(
                parent.info.experiment_id, run_name=child, tags={PARENT_TAG: run_id}
            ).info.run_id
        for name, value in metrics.items():
            client.log_metric(target, name, value)
        for path in artifacts:
            client.log_artifact(target, str(path))
        if child is not None:
            client.set_terminated(target)
    except MlflowException as e:
        raise RuntimeError(redact(f"MLflow run {run_id} at {uri}: {e}")) from None
    return target
