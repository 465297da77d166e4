"""Process environment for runs: offline by default, and paths resolved before workers start."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from trainer.config import RunConfig

# Nothing a run does may reach beyond 127.0.0.1 unless the user says so: no hub, no telemetry.
OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # MLflow draws a download bar whenever it appends to a table artefact (every evaluation's samples)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Ray folds lines that differ only in tokens holding a digit into "[repeated Nx across cluster]":
    # "rank 0 of 2 on Ray node <id>" and rank 1's became one line, and which node rank 1 ran on was lost
    "RAY_DEDUP_LOGS_ALLOW_REGEX": "riemann-tune:",
}


def apply_defaults() -> dict[str, str]:
    """Set the offline defaults where the user has not; returns the variables workers must inherit.

    Never DeepSpeed's accelerator (DS_ACCELERATOR): this process may have no GPU where its workers have
    some (a login node, a Ray head), so each worker chooses its own (trainer.device.select_accelerator).
    """
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in OFFLINE_DEFAULTS}


def clear_stale_build_locks(max_age_s: float = 900) -> list[Path]:
    """Remove torch extension build locks left by a killed build; returns the removed paths.

    DeepSpeed compiles its CPU shared-memory op on first use under a lock file that torch waits on
    forever; a build takes seconds, so a lock older than ``max_age_s`` belongs to a dead process.
    Called by the launcher before any worker starts.
    """
    from torch.utils.cpp_extension import get_default_build_root

    if "TORCH_EXTENSIONS_DIR" in os.environ:
        locks = Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock")
    else:  # torch adds a folder per Python and accelerator, e.g. py311_cpu/
        locks = Path(get_default_build_root()).glob("*/*/lock")
    removed = []
    for lock in locks:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            continue
    for lock in removed:
        logging.getLogger(__name__).warning("removed a stale build lock left by a killed process: %s", lock)
    return removed


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Relative paths in the config become absolute (relative to the current directory), once, here.

    Workers may run in another directory (Ray) or on another node; they must all see the same paths.
    """
    raw = cfg.model_dump(mode="json")
    raw["model"]["path"] = _absolute(raw["model"]["path"])
    if raw["model"].get("build"):
        raw["model"]["build"]["tokenizer_corpus"] = [
            _absolute(p) for p in raw["model"]["build"]["tokenizer_corpus"]
        ]
    for key in ("eval_path", "cache_dir"):
        if raw["data"].get(key):
            raw["data"][key] = _absolute(raw["data"][key])
    for source in raw["data"]["train_path"]:  # globs too: resolve() leaves the pattern intact
        source["path"] = _absolute(source["path"])
    raw["output"]["dir"] = _absolute(raw["output"]["dir"])
    uri = raw["tracking"].get("uri")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raw["tracking"]["uri"] = "sqlite:///" + _absolute(uri.removeprefix("sqlite:///"))
    return RunConfig.model_validate(raw)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``; nothing is looked up) is this machine's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def ray_address_host(address: str) -> str | None:
    """The host of a Ray cluster address (HOST:PORT, ray://HOST:PORT, or ``auto``), as Ray will find it.

    ``auto`` means $RAY_ADDRESS, else the cluster `ray start` last recorded in <tmp>/ray/ray_current_cluster;
    None when neither says.
    """
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or ""
        system_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # Ray's own order
        current = Path(system_tmp) / "ray" / "ray_current_cluster"
        if not address and current.is_file():
            address = current.read_text().strip()
    if not address:
        return None
    return urlsplit(address if "://" in address else f"//{address}").hostname


def launch_id(output_dir: str) -> str:
    """The id of this launch (Ray run name, restart count, the MLflow run it keeps across restarts).

    A requeued Slurm job is the same launch started again: its id derives from the job, so the new start
    counts as a restart and continues its MLflow run, even when the checkpoint it resumes from was sealed
    before the run's id was known. Elsewhere every launch is new.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return uuid.uuid4().hex
    key = f"slurm:{os.environ.get('SLURM_CLUSTER_NAME', '')}:{job}:{output_dir}"
    return uuid.uuid5(uuid.NAMESPACE_URL, key).hex


def keep_ray_on_loopback(cfg: RunConfig, env: dict[str, str]) -> None:
    """A local cluster (or one joined on loopback) lives on loopback: Ray must not look up (or advertise,
    or swap 127.0.0.1 for) the host's address. Read when ray is first imported; ``env`` (the workers')
    gets it too."""
    address = cfg.distributed.ray_address
    if not address or is_loopback(ray_address_host(address) or ""):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
