"""Shared fixtures. Everything here runs offline: no hub, no telemetry, nothing beyond 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="true",
    RAY_USAGE_STATS_ENABLED="0",
    TOKENIZERS_PARALLELISM="false",
)
# DeepSpeed picks its accelerator once, when first imported: the test process and the harnesses it starts
# train on the CPU even on a GPU host. Workers started through the launchers choose their own
# (trainer.device.select_accelerator), so a GPU test's workers still get CUDA.
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "huggingface"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# Under pytest -n N each worker, and every process it starts, gets its share of the cores: N workers each
# running a thread per core (while their training processes do the same) spend the suite contending.
if (xdist_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // xdist_workers)))

import pytest  # noqa: E402
import torch  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer.config import RunConfig, TinyModelSpec  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
# The demo trains on a synthetic task of short rows; tests that time a kill or a restart against its
# steps train it on the longer text-and-instruction examples instead, as before the demo changed.
TEXT_DATA = (
    f"data.train_path={ROOT / 'data/tiny/train.jsonl'}",
    f"data.eval_path={ROOT / 'data/tiny/eval.jsonl'}",
    "data.max_seq_len=192",  # the demo's before; a later override (e.g. 96) wins
    "train.sample_prompts=0",
)


# Modules that start clusters (Ray, Slurm) and run the demo, in two groups of about equal time: under
# pytest-xdist each group stays on one worker, so no more than two clusters ever share the cores.
CLUSTER_GROUPS = {
    "test_end_to_end": "clusters-a", "test_ray_failures": "clusters-a", "test_ray_cluster": "clusters-a",
    "test_sweep": "clusters-b", "test_slurm": "clusters-b",
}  # fmt: skip
# The other long groups, longest first (make test on 2 cores, 2026-12-02: the cluster groups about 9 min
# each, then these; every other module under a minute).
LONG_MODULES = ("test_plan", "test_resume", "test_adapters_e2e", "test_tracking",
                "test_preconditioner_distributed", "test_distributed")  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n 2 --dist loadgroup`` (what ``make test`` runs): a module's tests stay on one
    worker, so its module-scoped runs and servers are built once; the cluster modules form two groups,
    so no more than two clusters compete for the cores. The groups are collected longest first (the two
    cluster groups, then LONG_MODULES), and ``make test`` keeps that
    order (``--no-loadscope-reorder``): xdist then hands the short groups to whichever worker is free at
    the end, instead of finishing on a long one while the other worker idles."""
    for item in items:
        module = _module(item)
        item.add_marker(pytest.mark.xdist_group(CLUSTER_GROUPS.get(module, module)))
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=NO_GPU))
    items.sort(key=lambda item: _rank(_module(item)))


# Why a `gpu` test did not run (pytest -ra lists it): a GPU test can never fail on a machine without one.
NO_GPU = "gpu: needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False here)"


def _rank(module: str) -> int:
    if module in CLUSTER_GROUPS:
        return 0 if CLUSTER_GROUPS[module] == "clusters-a" else 1
    return 2 + (LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES))


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama with its own tokenizer, built once per session (no pre-training)."""
    from trainer.model import ensure_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    spec = TinyModelSpec(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512,
        tokenizer_corpus=[str(ROOT / "data" / "tiny" / "train.jsonl")],
    )  # fmt: skip
    ensure_tiny_model(str(path), spec)
    return path


@pytest.fixture()
def make_config(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., RunConfig]:
    """A RunConfig on the session's tiny model, local backend, one worker; overrides as dotted strings."""

    def make(*overrides: str) -> RunConfig:
        raw = {
            "model": {"path": str(tiny_model_dir)},
            "data": {
                "train_path": str(ROOT / "data" / "tiny" / "train.jsonl"),
                "eval_path": str(ROOT / "data" / "tiny" / "eval.jsonl"),
                "max_seq_len": 96,
            },
            "train": {"max_steps": 4, "micro_batch_size": 4},
            # CPU tests stay on the CPU on a GPU host too (2-worker runs would need 2 GPUs otherwise)
            "distributed": {"use_gpu": False},
            "tracking": {"enabled": False},
            "output": {"dir": str(tmp_path / "run")},
        }
        return config_lib.validate(config_lib.apply_overrides(raw, list(overrides)))

    return make


def run_cli(
    *args: str, cwd: Path = ROOT, timeout: float = 600, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m launch ARGS`` in a fresh process; output captured, failure shown in full."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "launch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"launch {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def write_config(cfg: RunConfig, path: Path) -> Path:
    path.write_text(config_lib.to_yaml(cfg))
    return path


def has_usable_checkpoint(root: Path) -> bool:
    """A whole (sealed) checkpoint exists under ``root``: one whose directory merely exists may still be
    being written, and a kill then would leave nothing to resume from."""
    from trainer.checkpoints import find_checkpoints, problem

    return any(problem(directory) is None for directory in find_checkpoints(root))


def load_adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def outbound_connects(strace_log: Path) -> list[str]:
    """connect() calls in an ``strace -f -e trace=connect`` log to anything but loopback (DNS included)."""
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    lines = [line for line in strace_log.read_text().splitlines() if "AF_INET" in line]
    return [line for line in lines if not any(f'"{a}"' in line for a in loopback)]


def start_cli(*args: str, log: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """``python -m launch ARGS`` in its own process group (so a test can kill it and all its workers)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "launch", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
