"""``python -m launch sweep CONFIG --grid KEY=V1,V2 [--grid ...]``: many fine-tunes of one config, each a
normal Ray Train run of its own (workers, ZeRO, checkpoints), run as Ray Tune trials on the cluster a run
would use, under one MLflow parent run with a nested child run per trial. At the end the parent holds the
comparison table, the robustness plot and the best config (launch/sweep_report.py).

The plan and its state: launch/sweep_plan.py; the Tune side: launch/ray_sweep.py (ray is imported there).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from launch.env import apply_defaults, clear_stale_build_locks, keep_ray_on_loopback, launch_id, resolve_paths
from launch.sweep_plan import (
    SweepPlan,
    grid_points,
    load_state,
    parse_grid,
    plan_trials,
    save_state,
    with_tracking,
)
from launch.sweep_report import Outcome, best_of, outcome_of, print_table, write_report
from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def add_parser(verbs: Any) -> None:
    sweep = verbs.add_parser(
        "sweep", help="many fine-tunes over a grid, as Ray Tune trials, one MLflow parent"
    )
    sweep.add_argument("config", type=Path, help="YAML run config (see configs/)")
    sweep.add_argument(
        "overrides", nargs="*", help="dotted overrides for every trial, e.g. train.max_steps=50"
    )
    sweep.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2,...",
        help="a swept key and its values (repeat for more keys); every combination is a trial",
    )  # fmt: skip
    sweep.add_argument("--search", choices=["grid", "random"], default="grid", help="grid: every combination")
    sweep.add_argument(
        "--samples", type=int, default=1,
        help="random: points drawn from the grid's values; grid: repeats, each with its own train.seed",
    )  # fmt: skip
    sweep.add_argument("--seed", type=int, default=0, help="the random search's seed")
    sweep.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what fits)")
    sweep.add_argument(
        "--scheduler", choices=["fifo", "asha"], default="fifo", help="asha: stop hopeless trials"
    )
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in output.dir")


def _check(args: argparse.Namespace, base: RunConfig) -> None:
    if args.scheduler == "asha" and base.train.eval_every_n_steps == 0:
        raise ConfigError(
            "--scheduler asha stops trials on their intermediate eval losses: "
            "set train.eval_every_n_steps > 0"
        )
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent}: must be >= 1")


def _plan(args: argparse.Namespace) -> tuple[RunConfig, SweepPlan]:
    """The base config (paths and tracking resolved once, here) and the validated trials."""
    from trainer.tracking import resolve_run

    grid = parse_grid(args.grid)
    # a sweep's trials are Ray Train runs, whatever backend the config names for `launch train`
    overrides = [*args.overrides, "distributed.backend=ray"]
    base = resolve_run(resolve_paths(config_lib.load(args.config, overrides)))
    _check(args, base)
    points = grid_points(grid, args.search, args.samples, args.seed)
    source = f"{args.config}" + (f" (with overrides {' '.join(args.overrides)})" if args.overrides else "")
    directory = Path(base.output.dir)
    trials = plan_trials(base.model_dump(mode="json"), source, points, directory)
    return base, SweepPlan(directory, list(points[0]), trials, args.search)


def _parent_params(args: argparse.Namespace, base: RunConfig, plan: SweepPlan) -> dict[str, str]:
    swept = {f"sweep.grid.{k}": ",".join(dict.fromkeys(t.point[k] for t in plan.trials)) for k in plan.keys}
    params = config_lib.flatten(base) | swept
    for key in ("tracking.run_id", "tracking.parent_run_id"):
        params.pop(key, None)
    return params | {
        "sweep.search": args.search, "sweep.samples": str(args.samples),
        "sweep.trials": str(len(plan.trials)), "sweep.scheduler": args.scheduler,
        "sweep.dir": str(plan.directory),
    }  # fmt: skip


def _prepare(base: RunConfig, plan: SweepPlan) -> None:
    """What the driver does once for every trial: the tiny model built, the sqlite store migrated."""
    from trainer.tracking import prepare_local_store

    prepare_local_store(base.tracking)
    clear_stale_build_locks()
    seen: set[tuple[str, str]] = set()
    for trial in plan.trials:  # the tiny demo model, built once per distinct spec (a swept model.* key)
        build = trial.cfg.model.build
        key = (trial.cfg.model.path, build.model_dump_json() if build else "")
        if build is not None and key not in seen:
            from trainer.model import ensure_tiny_model

            ensure_tiny_model(trial.cfg.model.path, build)
            seen.add(key)
    plan.directory.mkdir(parents=True, exist_ok=True)


def _start_parent(args: argparse.Namespace, base: RunConfig, plan: SweepPlan) -> None:
    """The sweep's MLflow parent run: created, or (a resumed sweep) marked running again."""
    if not base.tracking.enabled:
        return
    from trainer.tracking.sweep_run import start_parent_run

    name = base.tracking.run_name or plan.directory.name
    params = _parent_params(args, base, plan)
    plan.parent_run_id = start_parent_run(base.tracking, name, params, plan.parent_run_id)
    log.info("sweep: MLflow parent run %s at %s", plan.parent_run_id, base.tracking.uri)


def cmd_sweep(args: argparse.Namespace) -> int:
    env = apply_defaults()
    base, plan = _plan(args)
    load_state(plan, args.resume)
    _prepare(base, plan)
    keep_ray_on_loopback(base, env)
    todo = [t.index for t in plan.trials if not plan.finished(t)]
    done = len(plan.trials) - len(todo)
    print(f"sweep {plan.directory}: {len(plan.trials)} trials, {done} already done, {len(todo)} to run")

    def start() -> None:  # once the trials are known to fit: nothing is recorded for a sweep that cannot run
        _start_parent(args, base, plan)
        with_tracking(plan, base.tracking)
        save_state(plan)

    ran: dict[int, tuple[str | None, dict[str, Any]]] = {}
    if todo:
        from launch.ray_sweep import run_trials

        launch = launch_id(str(plan.directory))
        ran = run_trials(plan, todo, env, launch, args.max_concurrent, args.scheduler, on_placed=start)
    else:
        start()
    # Done for Tune, without error and without outputs: the scheduler stopped it. An interrupted trial is
    # not done, and a resume reruns it.
    for trial in (plan.trials[i] for i in todo):
        error, reported = ran.get(trial.index, ("not run", {}))
        if error is None and reported.get("done") and not plan.finished(trial):
            plan.stopped.append(trial.index)
    save_state(plan)
    outcomes = [outcome_of(t, plan, *ran.get(t.index, (None, {}))) for t in plan.trials]
    return _report(base, plan, outcomes)


def _report(base: RunConfig, plan: SweepPlan, outcomes: list[Outcome]) -> int:
    artefacts = write_report(plan, outcomes)
    print()
    print_table(plan, outcomes)
    best = best_of(outcomes)
    failed = [o for o in outcomes if o.status in ("failed", "not run")]
    for o in failed:
        print(f"{o.trial.name}: {o.status}" + (f": {o.error}" if o.error else ""))
    if best is not None:
        print(f"\nbest: {best.trial.name} ({' '.join(f'{k}={v}' for k, v in best.trial.point.items())}), "
              f"final eval loss {best.score:.6g}; its config: {plan.directory / 'best.yaml'}")  # fmt: skip
    print(f"report: {', '.join(str(p) for p in artefacts)}")
    if base.tracking.enabled and plan.parent_run_id:
        from trainer.tracking.sweep_run import finish_parent_run

        metrics = {"trials_finished": float(sum(o.status == "finished" for o in outcomes))}
        metrics["trials_stopped_early"] = float(sum(o.status == "stopped early" for o in outcomes))
        if best is not None and best.score is not None:
            metrics["best_eval_loss"] = best.score
        status = "FAILED" if failed else "FINISHED"
        assert base.tracking.uri
        finish_parent_run(base.tracking.uri, plan.parent_run_id, metrics, artefacts, status)
        print(f"mlflow: parent run {plan.parent_run_id} at {base.tracking.uri}")
    return 1 if failed else 0
