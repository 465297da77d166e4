"""``python -m launch submit CONFIG [overrides]``: a run as a Ray Job on an existing cluster.

The job runs ``python -m launch train CONFIG [overrides] distributed.backend=ray
distributed.ray_address=auto`` on the cluster's head, in a copy of the working directory (the project:
code, configs, small data) that Ray uploads. What must outlive the job (output.dir, a sqlite MLflow
store) has to be an absolute path on the cluster's shared filesystem; tokens are never sent with the
job: the cluster's nodes read them from their own environment. The Jobs API is served by Ray's full
dashboard (``ray[default]``, as in docker/'s images; the project's own dependency, ``ray[train]``, has
only the minimal one) on the head, on 127.0.0.1 unless the cluster was started otherwise.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig

# Never uploaded: environments, caches, outputs, VCS data (Ray also honours .gitignore files).
EXCLUDES = [".git", ".venv", ".cache", "runs", "*.db", "__pycache__", ".mypy_cache", ".ruff_cache"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard's Jobs API, on loopback unless said otherwise


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = verbs.add_parser("submit", help="submit the run as a Ray Job to an existing cluster")
    submit.add_argument("config", type=Path, help="YAML run config, inside the working directory")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    submit.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
        help=f"the cluster's Jobs API (default: $RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS}; "
        "reach a remote one through an SSH tunnel rather than exposing it)",
    )
    submit.add_argument(
        "--working-dir", type=Path, default=Path(), help="uploaded as the job's working directory"
    )
    submit.add_argument("--python", default="python", help="the interpreter on the cluster")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted")


def _check_outputs_survive(cfg: RunConfig, source: str) -> None:
    """The job's working directory is a temporary copy: outputs written there would vanish with it."""
    problems = []
    if not Path(cfg.output.dir).is_absolute():
        problems.append(f"output.dir: {cfg.output.dir!r} is relative to the job's temporary copy")
    uri = cfg.tracking.uri or ""
    if cfg.tracking.enabled and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        problems.append(f"tracking.uri: {uri!r} is relative to the job's temporary copy")
    if problems:
        hint = "give absolute paths on a filesystem every node sees (or a tracking server's URL)"
        raise ConfigError(f"{source}: " + "; ".join(problems) + f": {hint}")


def entrypoint(args: argparse.Namespace) -> str:
    """The job's command line, after validating the config here (errors surface before submission)."""
    workdir = args.working_dir.resolve()
    config = args.config.resolve()
    if not config.is_relative_to(workdir):
        raise ConfigError(f"{args.config}: the config must lie inside the working directory {workdir}")
    cfg = config_lib.load(config, args.overrides)
    _check_outputs_survive(cfg, str(args.config))
    train = [args.python, "-m", "launch", "train", str(config.relative_to(workdir)), *args.overrides]
    return shlex.join([*train, "distributed.backend=ray", "distributed.ray_address=auto"])


def cmd_submit(args: argparse.Namespace) -> int:
    command = entrypoint(args)
    from launch.ray_job import submit_job

    return submit_job(args.address, command, args.working_dir.resolve(), EXCLUDES, wait=not args.no_wait)
