"""Data parallelism changes nothing: 2 DeepSpeed processes equal 1 process with twice the accumulation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import load_adapter_tensors, run_cli, write_config
from trainer.config import RunConfig

pytestmark = pytest.mark.integration


def _train(make_config: Callable[..., RunConfig], tmp_path: Path, name: str, *overrides: str) -> Path:
    out = tmp_path / name
    cfg = make_config("train.max_steps=4", "train.dtype=fp32", f"output.dir={out}", *overrides)
    run_cli("train", str(write_config(cfg, tmp_path / f"{name}.yaml")))
    return out


def test_zero2_two_processes_equal_one_process(make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    """Same global batches (2 x 1 vs 1 x 2 micro-batches), same seed: same adapter.

    The only difference is the order in which the two micro-batch gradients are summed (an all-reduce
    vs an accumulation) and where DeepSpeed divides by 2: a few float32 ulps per step, which Adam's
    normalisation can amplify at most to ~lr * 1e-3 after 4 steps. 1e-5 absolute is far below any
    real bug (a wrong loss scale or a missing rank's gradient moves weights by ~lr = 1e-3 per step).
    """
    one = _train(make_config, tmp_path, "one", "distributed.num_workers=1", "train.grad_accum_steps=2")
    two = _train(make_config, tmp_path, "two", "distributed.num_workers=2", "distributed.zero_stage=2")
    a, b = load_adapter_tensors(one), load_adapter_tensors(two)
    assert a.keys() == b.keys() and a
    moved = max((t.abs().max().item() for k, t in a.items() if "lora_B" in k))
    assert moved > 1e-3, "the adapter did not train"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
