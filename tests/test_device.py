"""Where a worker trains: DeepSpeed's accelerator chosen per worker, GPU counts and shares checked by the
launchers, FlashAttention-2's needs, the collective timeout reaching the process group's creators, and
ZeRO buckets sized from the adapters. All on the CPU; tests/test_gpu.py has what needs a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DEMO_CONFIG, ROOT
from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig

ACCELERATOR_PROBE = """
import os, sys
from trainer.device import select_accelerator
select_accelerator(sys.argv[1] == "gpu")
from deepspeed.accelerator import get_accelerator
print("accelerator", get_accelerator().device_name(), os.environ["DS_ACCELERATOR"])
"""


@pytest.mark.unit
@pytest.mark.parametrize(
    ("inherited", "use_gpu", "expected"), [("cuda", "cpu", "cpu"), ("cpu", "gpu", "cuda")]
)
def test_the_worker_not_its_parent_decides_deepspeeds_accelerator(
    inherited: str, use_gpu: str, expected: str
) -> None:
    """A worker that inherits its launcher's DS_ACCELERATOR (a CPU login node's "cpu", or a GPU host's
    "cuda" for a use_gpu: false run) gets the accelerator its own use_gpu says, once DeepSpeed loads."""
    env = {**os.environ, "DS_ACCELERATOR": inherited}
    proc = subprocess.run(
        [sys.executable, "-c", ACCELERATOR_PROBE, use_gpu], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"accelerator {expected} {expected}" in proc.stdout


@pytest.mark.unit
def test_the_launcher_never_hands_its_accelerator_to_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_defaults returns what every worker inherits (the Ray job's env_vars): never DS_ACCELERATOR,
    even when the launcher's own environment has one; nor does it set one."""
    from launch.env import apply_defaults

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert "DS_ACCELERATOR" not in apply_defaults()
    monkeypatch.delenv("DS_ACCELERATOR")
    apply_defaults()
    assert "DS_ACCELERATOR" not in os.environ


@pytest.mark.unit
def test_deepspeed_on_another_accelerator_than_the_worker_is_refused() -> None:
    """This test process loaded DeepSpeed for the CPU (conftest): a GPU worker here must not go on."""
    from trainer.engine import check_accelerator

    check_accelerator(False)
    with pytest.raises(
        RuntimeError, match=r"'cpu' accelerator but this worker trains on 'cuda'.*select_accel"
    ):
        check_accelerator(True)


@pytest.mark.unit
@pytest.mark.parametrize("use_gpu", [None, True])
def test_a_fraction_of_a_gpu_per_worker_is_refused(use_gpu: bool | None, make_config: Callable) -> None:
    with pytest.raises(ConfigError, match=r"distributed.gpus_per_worker: 0.5 is not a whole number.*NCCL"):
        make_config(
            f"distributed.use_gpu={'null' if use_gpu is None else 'true'}", "distributed.gpus_per_worker=0.5"
        )
    assert (
        make_config("distributed.use_gpu=true", "distributed.gpus_per_worker=2").distributed.gpus_per_worker
        == 2
    )


@pytest.mark.unit
def test_a_fraction_of_a_gpu_is_ignored_on_cpus(make_config: Callable) -> None:
    assert (
        make_config("distributed.use_gpu=false", "distributed.gpus_per_worker=0.5").distributed.use_gpu
        is False
    )


@pytest.mark.unit
def test_more_gpu_workers_than_gpus_is_a_clear_error() -> None:
    from trainer.device import check_gpu_count

    check_gpu_count(2, 1, 2, "this machine")
    expected = (
        r"num_workers=2 x .*gpus_per_worker=1 needs 2 GPUs but the Ray cluster has 1: lower .* to at most 1"
    )
    with pytest.raises(ConfigError, match=expected):
        check_gpu_count(2, 1, 1, "the Ray cluster")


@pytest.mark.unit
def test_a_local_rank_without_its_gpu_is_named() -> None:
    import torch

    from trainer.device import local_device

    assert local_device(False, 3) == torch.device("cpu")
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"local rank {count} has no GPU: this machine has {count}"):
        local_device(True, count)


@pytest.mark.unit
def test_the_demo_and_the_test_configs_train_on_cpus() -> None:
    """On a GPU host the demo and the 2-worker tests still run (on CPUs, on purpose): use_gpu null would
    put 2 workers on GPUs a 1-GPU machine does not have."""
    for path in sorted((ROOT / "configs").glob("tiny-cpu*.yaml")):
        assert config_lib.load(path).distributed.use_gpu is False, path.name


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_the_launchers_refuse_more_gpu_workers_than_gpus(backend: str, tmp_path: Path) -> None:
    """Before: the local launcher's extra worker died on "invalid device ordinal", and Ray waited
    forever for GPUs (its start-up timeouts are retried without limit). Now both stop at once."""
    import torch

    gpus = torch.cuda.device_count()
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "train", str(DEMO_CONFIG), f"distributed.backend={backend}",
         "distributed.use_gpu=true", f"distributed.num_workers={gpus + 1}", "tracking.enabled=false",
         f"output.dir={tmp_path / 'run'}", "model.build=null", f"model.path={tmp_path / 'no-model'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    where = "this machine" if backend == "local" else "the Ray cluster"
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"needs {gpus + 1} GPUs but {where} has {gpus}" in proc.stderr


@pytest.mark.unit
def test_flash_attention_in_fp32_names_dtype_and_package(make_config: Callable) -> None:
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs train.dtype: bf16 .*flash-attn package.*"
                       r"train.dtype is fp32"):  # fmt: skip
        make_config("model.attn_implementation=flash_attention_2", "train.dtype=fp32")


@pytest.mark.unit
def test_flash_attention_without_its_package_or_gpu_fails_before_loading(make_config: Callable) -> None:
    """transformers would otherwise fetch a kernel from the hub (offline: a failure deep in loading)."""
    import torch

    from trainer.model import load_base_model

    cfg = make_config("model.attn_implementation=flash_attention_2", "train.dtype=bf16")
    with pytest.raises(
        ConfigError, match=r"needs train.dtype: bf16 .* and the flash-attn package .*: .*not a GPU"
    ):
        load_base_model(cfg.model, torch.bfloat16, torch.device("cpu"))


@pytest.mark.unit
def test_the_collective_timeout_reaches_every_process_group(make_config: Callable) -> None:
    """30 minutes unless configured, handed to Ray's backends (its file store and its TCP store); the
    local launcher and torchrun pass it to init_distributed (tests/test_collectives.py)."""
    from ray.train.torch import TorchConfig

    from launch.ray_job import _rendezvous

    cfg: RunConfig = make_config()
    assert cfg.distributed.collective_timeout_s == 1800
    local = _rendezvous(make_config("distributed.collective_timeout_s=95.5"), use_gpu=True)
    assert isinstance(local, TorchConfig) and local.timeout_s == 96 and local.backend == "nccl"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("trainable", "bucket"), [(16_384, 2**20), (3 * 2**20 + 1, 4 * 2**20), (10**10, 5 * 10**8)]
)
def test_zero_buckets_are_sized_from_the_trainable_parameters(
    trainable: int, bucket: int, make_config: Callable
) -> None:
    """DeepSpeed's default reduce bucket is 5e8 elements (1-2 GB per GPU, twice with overlap_comm) for a
    few million adapter parameters: the generated config holds the whole step's gradients, no more."""
    from trainer.engine import deepspeed_config

    for stage in (1, 2, 3):
        zero = deepspeed_config(make_config(f"distributed.zero_stage={stage}"), 2, trainable)[
            "zero_optimization"
        ]
        assert zero["reduce_bucket_size"] == bucket and zero["allgather_bucket_size"] == bucket
        assert bucket >= min(trainable, 5 * 10**8) and bucket % 2 == 0
