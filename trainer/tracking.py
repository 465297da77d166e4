"""Experiment tracking: a small Tracker protocol, an MLflow implementation and a null one.

This is the only module that imports mlflow. Exactly one process per job (rank 0) creates or resumes
the MLflow run; every other rank gets a NullTracker.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Protocol

import torch

from trainer import config as config_lib
from trainer.config import RunConfig, TrackingConfig

log = logging.getLogger(__name__)


class Tracker(Protocol):
    @property
    def run_id(self) -> str | None: ...
    @property
    def uri(self) -> str | None: ...

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
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

    def finish(self, status: str = "FINISHED") -> None:
        pass


def default_uri(cfg: TrackingConfig, output_dir: str) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a sqlite store beside the output directory."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


class MlflowTracker:
    """One MLflow run, created (or resumed by id) on construction."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._logged_params: dict[str, str] = {}
        if run_id is None:
            experiment_id = self._experiment_id(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        else:  # a resumed or restarted job continues its run
            self.client.update_run(run_id, status="RUNNING")
            self._logged_params = dict(self.client.get_run(run_id).data.params)
        self.run_id: str = run_id

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if self.uri.startswith("sqlite:///"):
            # A sqlite store keeps no artifacts itself: put them beside the database, never in ./mlruns.
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
        return str(self.client.create_experiment(name, artifact_location=location))

    def log_params(self, params: dict[str, str]) -> None:
        """Log params; on a continued run, values that changed (MLflow params are immutable) become
        ``param_changed.<key>`` tags."""
        from mlflow.entities import Param

        changed = {
            k: v for k, v in params.items() if k in self._logged_params and self._logged_params[k] != v[:6000]
        }
        if changed:
            self.set_tags({f"param_changed.{k}": v for k, v in changed.items()})
        items = [Param(k, v[:6000]) for k, v in params.items() if k not in self._logged_params]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class MetricsFile:
    """Forwards to another tracker and appends every metrics row to a local jsonl file first.

    The file is the run's own record: it exists whatever happens to the tracking server.
    """

    def __init__(self, path: Path, inner: Tracker) -> None:
        self.path = path
        self.inner = inner
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")

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

    def finish(self, status: str = "FINISHED") -> None:
        self._file.close()
        self.inner.finish(status)


def make_tracker(cfg: TrackingConfig, output_dir: str, rank: int, run_id: str | None = None) -> Tracker:
    """Rank 0: MLflow (if enabled) behind a local metrics.jsonl; other ranks: nothing."""
    if rank != 0:
        return NullTracker()
    inner: Tracker = NullTracker()
    if cfg.enabled:
        uri = default_uri(cfg, output_dir)
        inner = MlflowTracker(uri, cfg.experiment, cfg.run_name or Path(output_dir).name, run_id)
    return MetricsFile(Path(output_dir) / "metrics.jsonl", inner)


def run_tags(cfg: RunConfig, world_size: int, launcher: str) -> dict[str, str]:
    """What a user filters runs by: where and how the run ran, and with which versions."""
    import deepspeed
    import transformers

    tags = {
        "launcher": launcher,
        "world_size": str(world_size),
        "hostname": platform.node(),
        "adapter.method": cfg.adapter.method,
        "versions.torch": torch.__version__,
        "versions.deepspeed": deepspeed.__version__,
        "versions.transformers": transformers.__version__,
    }
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("RIEMANN_TUNE_GIT_COMMIT", "git_commit")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def start_tracking(
    cfg: RunConfig, *, rank: int, world_size: int, launcher: str, run_id: str | None = None
) -> Tracker:
    """The run's tracker (rank 0; a null one elsewhere) with the resolved config and tags logged;
    ``run_id`` continues an existing run (resume, restart)."""
    tracker = make_tracker(cfg.tracking, cfg.output.dir, rank, run_id)
    tracker.log_params(config_lib.flatten(cfg))
    tracker.set_tags(run_tags(cfg, world_size, launcher))
    return tracker


def log_outputs(tracker: Tracker, out: Path) -> None:
    """Upload the run's outputs and close the run."""
    for name in ("config.yaml", "summary.json"):
        tracker.log_artifact(out / name)
    tracker.log_artifact(out / "adapter", "adapter")
    tracker.finish()
