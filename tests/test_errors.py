"""A user's error from a worker reaches the terminal as one line; Ray's own chatter goes to a log file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.errors import usage_error
from launch.ray_job import NO_STATE_API_NOISE, WorkerLines
from trainer.config import ConfigError
from trainer.data import DataError

pytestmark = pytest.mark.unit


def test_the_users_error_is_found_inside_rays_worker_group_error() -> None:
    from ray.train import WorkerGroupError

    bad_row = DataError("chat.jsonl: row 17: messages[0] must be an object")
    wrapped = WorkerGroupError("worker errors", {1: RuntimeError("peer gone"), 0: bad_row})
    assert usage_error(wrapped) is bad_row
    try:
        raise RuntimeError("while launching") from ConfigError("train.max_steps: must be > 0")
    except RuntimeError as e:
        assert isinstance(usage_error(e), ConfigError)
    assert usage_error(WorkerGroupError("worker errors", {0: RuntimeError("OOM")})) is None


def test_the_ray_driver_and_controller_import_no_training_stack() -> None:
    """Ray's TrainController unpickles the trainer from launch.ray_job (and a failed worker's error): it
    must not import DeepSpeed, transformers or datasets to do so (7 s of every Ray run's start-up)."""
    heavy = ("deepspeed", "transformers", "datasets", "bitsandbytes")
    code = f"import sys, launch.ray_job, launch.errors; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing launch.ray_job pulls in {out.strip()}"


def _batch(actor: str, *lines: str, pid: int = 7) -> dict[str, object]:
    return {"actor_name": actor, "pid": pid, "lines": list(lines), "is_err": True}


def test_worker_lines_show_the_run_and_hold_back_rays_internals(tmp_path: Path) -> None:
    router = WorkerLines(tmp_path / "ray.log")
    assert router.split(_batch("TrainController", "Requesting resources: {'CPU': 1.0} * 2")) == (
        [], ["Requesting resources: {'CPU': 1.0} * 2"],
    )  # fmt: skip
    progress = "00:38:51 [rank 0] trainer: world size 2 on cpu"
    traceback = [
        "Error in training function:", "Traceback (most recent call last):",
        '  File "/work/trainer/worker.py", line 129, in run_worker', "    raise DataError(",
        "trainer.data.sources.DataError: bad.jsonl: row 6: field 'instruction' must be a string",
    ]  # fmt: skip
    shown, held = router.split(_batch("RayTrainWorker", progress, *traceback[:3]))
    assert shown == [progress] and held == traceback[:3]
    # the block goes on in the next batch, up to the exception's line; then lines show again
    shown, held = router.split(_batch("RayTrainWorker", *traceback[3:], "after"))
    assert held == traceback[3:] and shown == ["after"]
    assert router.split(_batch("RayTrainWorker", f"x {NO_STATE_API_NOISE} y"))[0] == []
    router.hold(_batch("TrainController"), ["held line"])
    assert (tmp_path / "ray.log").read_text() == "(TrainController pid=7) held line\n"
