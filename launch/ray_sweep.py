"""A sweep's trials as Ray Tune trials, as Ray documents Tune with Ray Train (V2): each trial is a Tune
function trainable that builds the run's TorchTrainer (``launch.ray_job.build_trainer``, the one
``launch train`` uses: same workers, ZeRO, checkpoints) and fits it; the workers' reports reach Tune
through ``TuneReportCallback``. Tune places, limits and (with ASHA) stops the trials.

With launch/ray_job.py, the only modules that import ray.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from launch.ray_job import TRIAL_METRIC, build_trainer, cluster_use_gpu, connect, warn_open_dashboard
from launch.sweep_plan import SweepPlan, Trial
from trainer.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# A trial's own Tune actor only waits on its TorchTrainer (whose controller asks for no CPU either). Tune
# refuses a trial that asks for nothing, so it asks for a sliver: what a trial takes from the cluster is
# its workers' resources, plus this.
DRIVER_CPUS = 0.01
TRIAL_DRIVER: dict[str, float] = {"cpu": DRIVER_CPUS}


class PlacementError(ConfigError):
    """A trial's workers cannot be placed on the cluster at all: the sweep would wait forever."""


@dataclass(frozen=True)
class TrialNeeds:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 when the trials train on CPUs

    @classmethod
    def of(cls, cfg: RunConfig) -> TrialNeeds:
        d = cfg.distributed
        return cls(d.num_workers, d.cpus_per_worker, d.gpus_per_worker if d.use_gpu else 0.0)

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + DRIVER_CPUS

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


def concurrency(needs: TrialNeeds, cpus: float, gpus: float, requested: int | None, trials: int) -> int:
    """How many trials run at once: as many as fit on ``cpus`` and ``gpus`` (the cluster's totals), at
    most ``requested``; a trial that cannot fit at all stops the sweep with the numbers."""
    if needs.cpus > cpus:
        raise PlacementError(
            f"a trial needs {needs.workers} workers x {needs.cpus_per_worker:g} CPUs = "
            f"{needs.workers * needs.cpus_per_worker:g} CPUs "
            f"(distributed.num_workers x distributed.cpus_per_worker), the Ray cluster has {cpus:g}: "
            "lower them, or join a larger cluster (distributed.ray_address)"
        )
    if needs.gpus > gpus:
        raise PlacementError(
            f"a trial needs {needs.workers} workers x {needs.gpus_per_worker:g} GPUs = {needs.gpus:g} GPUs "
            f"(distributed.num_workers x distributed.gpus_per_worker), the Ray cluster has {gpus:g}: "
            "lower them, or set distributed.use_gpu=false"
        )
    fits = math.floor(cpus / needs.cpus)
    if needs.gpus:
        fits = min(fits, math.floor(gpus / needs.gpus))
    if requested is not None and requested > fits:
        log.warning("--max-concurrent %d: only %d trials fit on the cluster at once", requested, fits)
    return max(1, min(fits, requested or fits, trials))


def _trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: the run's TorchTrainer, fitted; its workers report every eval loss to Tune."""
    t = config["trial"]
    cfg = RunConfig.model_validate(t["config"])
    trainer = build_trainer(
        cfg, t["job_id"], t["run_name"], callbacks=[TuneReportCallback()], report_evals=True
    )
    trainer.fit()


def _scheduler(kind: str, cfg: RunConfig) -> ASHAScheduler | None:
    if kind != "asha":
        return None
    # A trial resumed from a checkpoint reports its next checkpoint before its next eval loss: ASHA skips
    # such a result, but Tune's strict check would fail the trial for it (a documented Tune variable).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # stop_last_trials=False: a trial that reaches max_steps writes its outputs; ASHA only stops trials at
    # its rungs (from the first eval on), never one in its last steps.
    return ASHAScheduler(
        time_attr="step", metric=TRIAL_METRIC, mode="min", max_t=cfg.train.max_steps,
        grace_period=max(1, cfg.train.eval_every_n_steps), reduction_factor=2, stop_last_trials=False,
    )  # fmt: skip


def _payload(plan: SweepPlan, trial: Trial, launch: str) -> dict[str, Any]:
    return {
        "index": trial.index,
        "config": trial.cfg.model_dump(mode="json"),
        "job_id": plan.job_id(trial),
        "run_name": f"{trial.name}-{launch[:8]}",  # one Ray Train run per launch, as `launch train`
    }


def run_trials(
    plan: SweepPlan,
    todo: list[int],
    env: dict[str, str],
    launch: str,
    max_concurrent: int | None,
    scheduler: str,
    on_placed: Callable[[], None],
) -> dict[int, tuple[str | None, dict[str, Any]]]:
    """Run the trials numbered ``todo`` as Tune trials; returns, per trial, its error (None if none) and
    its last reported metrics. Raises PlacementError, before any trial starts, when a trial cannot be
    placed; ``on_placed`` is called once they can (the driver then starts the MLflow parent run)."""
    base = plan.trials[todo[0]].cfg
    warn_open_dashboard(base)
    connect(base, env, concurrent_runs=min(max_concurrent or 1, len(todo)))
    try:
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        # the least that fits over every trial: a swept distributed.* key may change what a trial needs
        concurrent = min(
            concurrency(
                TrialNeeds.of(cluster_use_gpu(plan.trials[i].cfg)), cpus, gpus, max_concurrent, len(todo)
            )
            for i in todo
        )
        on_placed()
        resolved = [Trial(t.index, t.point, cluster_use_gpu(t.cfg)) for t in (plan.trials[i] for i in todo)]
        log.info(
            "sweep: %d trials to run, %d at a time, on %g CPUs and %g GPUs", len(todo), concurrent, cpus, gpus
        )
        tuner = tune.Tuner(
            tune.with_resources(_trial_fn, TRIAL_DRIVER),
            param_space={"trial": tune.grid_search([_payload(plan, t, launch) for t in resolved])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrent, scheduler=_scheduler(scheduler, base)
            ),
            run_config=tune.RunConfig(
                name=f"tune-{launch[:8]}", storage_path=str((plan.directory / "tune").resolve()), verbose=1
            ),
        )
        results = tuner.fit()
        outcomes: dict[int, tuple[str | None, dict[str, Any]]] = {}
        for result in (results[i] for i in range(len(results))):
            index = int((result.config or {})["trial"]["index"])
            error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
            outcomes[index] = (error, dict(result.metrics or {}))
        return outcomes
    finally:
        ray.shutdown()
