"""Experiment tracking with MLflow: the tracker, its configuration, and what a run logs.

This is the only module of the trainer that imports mlflow (the Tracker protocol and the trackers that
need no server live in trainer/tracking/base.py). Exactly one process per job (rank 0)
creates or resumes the MLflow run; every other rank gets a NullTracker.

The tracking server is never the reason a run dies or waits: every MLflow call runs in a background
sender (trainer/tracking/sender.py) with a bounded queue and retries, so ``log_metrics`` only
enqueues. The run itself is created (or resumed) by that sender, so a server that is down at start-up
only delays it. Every metrics row is first appended to ``metrics.jsonl`` in the output directory,
whatever happens to the server; at the end the summary says how many rows never reached it.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig, TrackingConfig
from trainer.tracking.base import MetricsFile, NullTracker, Tracker
from trainer.tracking.loss_curve import plot_loss_curve
from trainer.tracking.provenance import run_tags
from trainer.tracking.sender import Row, Sender, Task

__all__ = [
    "MetricsFile",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "log_outputs",
    "make_tracker",
    "start_tracking",
]

log = logging.getLogger(__name__)

# Values never to appear in anything we log: credentials MLflow (or an artefact store) reads itself.
SECRET_ENV = (
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "DATABRICKS_TOKEN",
)  # fmt: skip
# MLflow error codes that the same request will meet again: retrying them is pointless.
PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED",
    "UNAUTHENTICATED", "BAD_REQUEST", "INVALID_STATE", "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED",
}  # fmt: skip
PARENT_RUN_TAG = "mlflow.parentRunId"
JOB_KEY_TAG = "riemann_tune.job_key"  # finds a run whose creation succeeded but whose reply was lost
RESUMES_TAG = "riemann_tune.resumes"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def redact(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """``text`` with the value of every credential variable (SECRET_ENV) replaced by ***."""
    for name in SECRET_ENV:
        secret = environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def describe_error(e: BaseException) -> str:
    """One redacted line: the exception's type and the first line of its message (for a connection
    failure, just the OS error: urllib3's message repeats the URL and the pool three times)."""
    first = (str(e).splitlines() or [""])[0]
    if os_error := re.search(r"\[Errno -?\d+\] [^'\")]+", first):
        first = f"cannot connect: {os_error.group(0)}"
    return redact(f"{type(e).__name__}: {first}")[:400]


def is_permanent(e: BaseException) -> bool:
    """A failure that a retry would meet again (a rejected request, a missing file), not an outage."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in PERMANENT_ERRORS
    return isinstance(e, (FileNotFoundError, IsADirectoryError, ValueError, TypeError, KeyError))


def resolve_tracking(cfg: TrackingConfig, output_dir: str) -> TrackingConfig:
    """URI, experiment and run name: the config, else MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, else
    a sqlite store beside the output directory, ``default`` and the output directory's name."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and urlsplit(uri).username is not None:
        raise ConfigError(
            "MLFLOW_TRACKING_URI: must not contain credentials: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
        )
    return cfg.model_copy(
        update={
            "uri": uri or f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}",
            "experiment": cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "default",
            "run_name": cfg.run_name or Path(output_dir).name,
        }
    )


def prepare_local_store(cfg: TrackingConfig) -> None:
    """Create a local sqlite store's schema now, once, in the launching process.

    MLflow migrates a new sqlite database on first use (seconds); if the workers did it, a worker killed
    in the middle (a preemption, a Ray restart) would leave a half-migrated file that no later attempt
    can open. Remote stores need nothing.
    """
    if cfg.enabled and cfg.uri and cfg.uri.startswith("sqlite:///"):
        from mlflow.tracking import MlflowClient

        Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=cfg.uri).search_experiments(max_results=1)


def resolve_run(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its tracking section resolved (when tracking is on): what a run logs as params."""
    if not cfg.tracking.enabled:
        return cfg
    return cfg.model_copy(update={"tracking": resolve_tracking(cfg.tracking, cfg.output.dir)})


def ensure_experiment(client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name`` at ``uri``, created if missing (with its artefacts beside a sqlite
    store, never in ./mlruns)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):
        # A sqlite store keeps no artifacts itself: put them beside the database, never in ./mlruns.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException as e:  # another job created it in between
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        log.debug("experiment %s appeared meanwhile: %s", name, describe_error(e))
        return str(again.experiment_id)


class MlflowTracker:
    """One MLflow run, created (or resumed by id) by a background sender; every call only enqueues.

    ``cfg`` must be resolved (``resolve_tracking``). ``run_id`` is None until the run exists (a new run
    on a server that is down at start-up); a resumed run's id is known from the start.
    """

    def __init__(self, cfg: TrackingConfig, run_id: str | None = None, job_key: str | None = None) -> None:
        assert cfg.uri and cfg.experiment and cfg.run_name, "resolve_tracking(cfg) first"
        self.cfg, self.uri = cfg, cfg.uri
        if cfg.uri.startswith(("http://", "https://")):
            # The sender retries with its own backoff; MLflow's (7 retries, ~4 min) would hold one
            # request hostage through an outage. Read per request; this is rank 0's own process.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout_s)
        self.client: Any = (
            None  # made by the sender: a sqlite store migrates its schema (seconds) on creation
        )
        self._run_id = run_id
        self._existing_params: dict[str, str] | None = None  # a resumed run's params
        self._resumes = 0
        # A launch's job id: workers Ray restarts within the launch find the run their first attempt made.
        self._job_key = job_key or uuid.uuid4().hex
        self._create_tried = job_key is not None
        self._monitor: Any = None
        self._given_up = False
        self._sender = Sender(
            self._connect, self._send_rows, capacity=cfg.queue_size, retry_max_s=cfg.retry_max_s,
            is_permanent=is_permanent, describe=describe_error, on_recover=self._restart_monitor,
            name=f"MLflow at {cfg.uri}",
        )  # fmt: skip

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # -- what the run calls (any thread; never waits on the server) ---------------------------------

    def log_params(self, params: dict[str, str]) -> None:
        self._sender.submit(Task("params", lambda: self._log_params(dict(params))))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._sender.submit(Task("tags", lambda: self._set_tags(dict(tags))))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._sender.submit_rows((step, dict(metrics), int(time.time() * 1000)))

    def backfill(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Send the metric values among ``rows`` that the run lacks (by key and step): a resumed run's
        record of steps whose rows were queued, never sent, when its previous attempt was killed."""
        if rows:
            self._sender.submit(Task("backfill", lambda: self._backfill(rows)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        def upload() -> None:
            if path.is_dir():
                self.client.log_artifacts(self._id(), str(path), artifact_path)
            else:
                self.client.log_artifact(self._id(), str(path), artifact_path)

        self._sender.submit(
            Task(f"artefact {artifact_path + '/' if artifact_path else ''}{path.name}", upload)
        )

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows appended to the run's table artefact ``<name>.json``, which the MLflow UI shows as a table
        (MLflow's log_table reads the artefact back and appends)."""
        columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        if columns:
            self._sender.submit(
                Task(f"table {name}", lambda: self.client.log_table(self._id(), columns, f"{name}.json"))
            )

    def register_model(self, name: str, artifact_path: str) -> None:
        self._sender.submit(Task(f"model version of {name}", lambda: self._register(name, artifact_path)))

    def flush(self) -> dict[str, Any]:
        """Wait (up to drain_timeout_s) for the queued metrics; the tracking part of the run's summary."""
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        if not self._sender.wait_idle(deadline):
            self._sender.give_up(grace_s=self.cfg.request_timeout_s + 1.0)
            self._given_up = True
        report = self._sender.report()
        total = report.rows_sent + report.rows_dropped
        if not report.connected:
            log.warning(
                "MLflow at %s was unreachable for the whole run (%s): no MLflow run was created; %d "
                "metric rows were not logged there (metrics.jsonl holds them all)",
                self.uri, report.last_error, report.rows_dropped,
            )  # fmt: skip
        elif report.rows_dropped:
            log.warning(
                "MLflow: %d of %d metric rows never reached %s (last error: %s); metrics.jsonl holds "
                "them all",
                report.rows_dropped, total, self.uri, report.last_error,
            )  # fmt: skip
        return {
            "mlflow_run_id": self._run_id if report.connected else None,
            "mlflow_tracking_uri": self.uri,
            "mlflow_metric_rows": total,
            "mlflow_metric_rows_dropped": report.rows_dropped,
        }

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (after what is queued), waiting up to drain_timeout_s unless already given up."""
        self._sender.submit(Task("closing the run", lambda: self._terminate(status)))
        wait = 0.0 if self._given_up else self.cfg.drain_timeout_s
        report = self._sender.stop(time.monotonic() + wait, grace_s=self.cfg.request_timeout_s + 1.0)
        if not report.connected and not self._given_up:
            log.warning("MLflow at %s was unreachable (%s): this run is not recorded there",
                        self.uri, report.last_error)  # fmt: skip
        elif report.connected and report.tasks_failed:
            log.warning("MLflow: not done at %s: %s", self.uri, ", ".join(report.tasks_failed))
        elif report.connected:
            log.info("MLflow run %s (%s) at %s", self._run_id, status, self.uri)

    # -- the sender's side ------------------------------------------------------------------------------

    def _id(self) -> str:
        assert self._run_id is not None, "runs only after _connect"
        return self._run_id

    def _connect(self) -> None:
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        if self._run_id is not None and self._existing_params is None:
            self._resume(self._run_id)
        if self._run_id is None:
            self._run_id = self._create_run()
            log.info("MLflow run %s created at %s", self._run_id, self.uri)
        self._start_monitor(resume=self._resumes > 0)

    def _resume(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s does not exist at %s: starting a new run", run_id, self.uri)
            self._run_id = None
            return
        self._resumes = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, RESUMES_TAG, str(self._resumes))
        self._existing_params = dict(run.data.params)
        log.info("MLflow run %s resumed at %s (resume %d)", run_id, self.uri, self._resumes)

    def _create_run(self) -> str:
        experiment_id = self._experiment_id(str(self.cfg.experiment))
        if self._create_tried:  # the last attempt may have created the run before its reply was lost
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{JOB_KEY_TAG}` = '{self._job_key}'", max_results=1
            )
            if found:
                return str(found[0].info.run_id)
        self._create_tried = True
        tags = {JOB_KEY_TAG: self._job_key}
        if self.cfg.parent_run_id:
            tags[PARENT_RUN_TAG] = self.cfg.parent_run_id  # MLflow nests the run under its parent
        run = self.client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags)
        return str(run.info.run_id)

    def _experiment_id(self, name: str) -> str:
        return ensure_experiment(self.client, self.uri, name)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        params = {k: v[:6000] for k, v in params.items()}  # MLflow's limit on a param value
        if self._existing_params is not None:  # params are immutable: log only the new ones
            changed = sorted(k for k, v in params.items() if self._existing_params.get(k, v) != v)
            if changed:
                log.warning("MLflow run %s resumed with changed params (kept as first logged): %s",
                            self._run_id, ", ".join(changed))  # fmt: skip
            params = {k: v for k, v in params.items() if k not in self._existing_params}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self._id(), params=items[i : i + 100])

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self._id(), tags=[RunTag(k, v[:8000]) for k, v in tags.items()])

    def _send_rows(self, rows: list[Row]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), ts, step) for step, values, ts in rows for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit for metrics
            # A retry after a partial success resends exact duplicates, which the store ignores.
            self.client.log_batch(self._id(), metrics=metrics[i : i + 1000])

    def _backfill(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        keys = {key for _, values in rows for key in values}
        have = {key: {m.step for m in self.client.get_metric_history(self._id(), key)} for key in keys}
        now = int(time.time() * 1000)
        missing = [Metric(key, float(value), now, step) for step, values in rows
                   for key, value in values.items() if step not in have[key]]  # fmt: skip
        for i in range(0, len(missing), 1000):
            self.client.log_batch(self._id(), metrics=missing[i : i + 1000])
        if missing:
            steps = sorted({m.step for m in missing})
            log.info("MLflow run %s: sent %d metric values of steps %s again from metrics.jsonl "
                     "(queued, never sent, when the previous attempt ended)", self._id(), len(missing),
                     f"{steps[0]}..{steps[-1]}")  # fmt: skip

    def _register(self, name: str, artifact_path: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name, source=f"runs:/{self._id()}/{artifact_path}", run_id=self._id()
        )
        log.info("registered the adapter as %s version %s", name, version.version)

    def _terminate(self, status: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self._id(), status=status)

    def _start_monitor(self, resume: bool) -> None:
        if not self.cfg.system_metrics or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil missing
            log.warning("MLflow system metrics are off: %s (they need psutil)", e)
            return
        self._monitor = SystemMetricsMonitor(
            self._id(), sampling_interval=self.cfg.system_metrics_interval_s, resume_logging=resume,
            tracking_uri=self.uri,
        )  # fmt: skip
        self._monitor.start()

    def _restart_monitor(self) -> None:
        """MLflow's monitor thread ends at the first failed request: start a fresh one after an outage."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
            self._start_monitor(resume=True)


def make_tracker(
    cfg: TrackingConfig,
    output_dir: str,
    rank: int,
    run_id: str | None = None,
    job_key: str | None = None,
    resumed_at: int | None = None,
) -> Tracker:
    """Rank 0: MLflow (if enabled; continuing ``run_id`` if given, or the run of launch ``job_key``)
    behind a local metrics.jsonl (cut back to ``resumed_at``, the checkpoint's step, on a resume);
    other ranks: nothing."""
    if rank != 0:
        return NullTracker()
    inner: Tracker = NullTracker()
    if cfg.enabled:
        inner = MlflowTracker(resolve_tracking(cfg, output_dir), run_id or cfg.run_id, job_key)
    return MetricsFile(Path(output_dir) / "metrics.jsonl", inner, resumed_at)


def start_tracking(
    cfg: RunConfig,
    *,
    rank: int,
    world_size: int,
    launcher: str,
    run_id: str | None = None,
    job_key: str | None = None,
    resumed_at: int | None = None,
) -> Tracker:
    """The run's tracker (rank 0; a null one elsewhere) with the resolved config and tags queued.

    ``run_id`` (or ``tracking.run_id``): continue that MLflow run, e.g. the one a checkpoint recorded;
    ``resumed_at``: the step of the checkpoint the run resumes from.
    """
    if rank != 0:
        return NullTracker()
    cfg = resolve_run(cfg)
    tracker = make_tracker(cfg.tracking, cfg.output.dir, rank, run_id, job_key, resumed_at)
    params = config_lib.flatten(cfg)
    for key in ("tracking.run_id", "tracking.parent_run_id"):  # ids (the second is a tag), not settings
        params.pop(key, None)
    tracker.log_params(params)
    tracker.set_tags(run_tags(cfg, world_size, launcher, dict(os.environ)))
    return tracker


def adapter_artifacts(adapter_dir: Path, include_weights: bool) -> list[Path]:
    """The adapter directory's files to upload: every small file (configs, a rank map such as SARA's
    rank_map.json), and the weights only when asked."""
    files = sorted(p for p in adapter_dir.rglob("*") if p.is_file()) if adapter_dir.is_dir() else []
    return [p for p in files if include_weights or not p.name.endswith(WEIGHT_SUFFIXES)]


def log_outputs(tracker: Tracker, cfg: TrackingConfig, out: Path) -> None:
    """Draw the loss curve, upload the run's outputs (and register the adapter if asked), close the run."""
    plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "loss_curve.png"):
        if (out / name).is_file():
            tracker.log_artifact(out / name)
    adapter = out / "adapter"
    for path in adapter_artifacts(adapter, cfg.log_adapter):
        tracker.log_artifact(path, Path("adapter", path.parent.relative_to(adapter)).as_posix())
    if cfg.registered_model:
        tracker.register_model(cfg.registered_model, "adapter")
    tracker.finish()
