"""Where, how and with what a run ran: the tags a user filters and compares runs by.

Only named variables are read from the environment (job ids, the commit): the environment as a whole
is never logged, since it may hold credentials.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from trainer.config import RunConfig

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "mlflow", "ray", "riemann-tune")

# (environment variable, tag): the scheduler's ids of this job, set by the scheduler or the launcher.
JOB_IDS = (
    ("SLURM_JOB_ID", "slurm_job_id"),
    ("SLURM_CLUSTER_NAME", "slurm_cluster"),
    ("RIEMANN_TUNE_RAY_JOB_ID", "ray_job_id"),  # launch/ray_job.py sets it in every Ray worker
    ("TORCHELASTIC_RUN_ID", "torchelastic_run_id"),
)
GIT_COMMIT_ENV = "RIEMANN_TUNE_GIT_COMMIT"  # where there is no checkout (an image): set at build time


def run_tags(cfg: RunConfig, world_size: int, launcher: str, environ: dict[str, str]) -> dict[str, str]:
    """The run's tags: launcher, job ids, host, world size, hardware, commit and package versions."""
    tags = {
        "launcher": launcher,
        "world_size": str(world_size),
        "hostname": platform.node(),
        "mlflow.user": _user(),
        "adapter.method": cfg.adapter.method,
        **{tag: environ[env] for env, tag in JOB_IDS if environ.get(env)},
        **hardware(),
        **git_tags(environ),
        "versions.python": platform.python_version(),
    }
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # not installed: no tag
            tags[f"versions.{package}"] = importlib.metadata.version(package)
    return tags


def hardware() -> dict[str, str]:
    """The CPU model, cores and torch's threads per process and, with CUDA, rank 0's GPU model, count and
    CUDA version."""
    tags = {"cpu": cpu_model(), "cpu_count": str(_cpu_count()), "cpu_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        tags |= {
            "gpu": torch.cuda.get_device_name(0),
            "gpu_count": str(torch.cuda.device_count()),
            "versions.cuda": str(torch.version.cuda),
        }
    return tags


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def git_tags(environ: dict[str, str]) -> dict[str, str]:
    """The project's commit (and whether the checkout had uncommitted changes), when known."""
    commit = environ.get(GIT_COMMIT_ENV) or _git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit}  # the second: the UI's column
    if not environ.get(GIT_COMMIT_ENV):
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        if dirty is not None:
            tags["git_dirty"] = str(bool(dirty)).lower()
    return tags


def _git(*args: str) -> str | None:
    """A git command in this package's checkout; None without git or outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"
