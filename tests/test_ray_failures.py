"""A Ray worker killed mid-run: Ray restarts the workers from the last checkpoint and the job finishes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import DEMO_CONFIG, has_usable_checkpoint, start_cli, wait_for
from trainer.export import read_adapter

pytestmark = pytest.mark.slow


def _train_workers(launcher_pid: int) -> list[psutil.Process]:
    """This launch's Ray Train worker processes (descendants of the launcher only)."""
    found = []
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killed_worker_is_restarted_from_the_last_checkpoint(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = start_cli(
        "train", str(DEMO_CONFIG),
        "train.max_steps=40", "checkpoint.every_n_steps=4", "distributed.max_failures=1",
        "train.eval_every_n_steps=0", "train.eval_max_batches=1",
        f"output.dir={out}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        log=tmp_path / "run.log",
    )  # fmt: skip
    try:
        wait_for(lambda: has_usable_checkpoint(out / "checkpoints"), 600, "the first checkpoint", proc)
        workers = _train_workers(proc.pid)
        assert len(workers) == 2, f"expected 2 train workers, found {[w.pid for w in workers]}"
        workers[1].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert "resumed from" in log, "the restarted workers did not resume from a checkpoint"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40
    client = MlflowClient(summary["mlflow_tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]], "a restart must not open a second run"
    assert runs[0].data.tags["restarts"] == "1" and runs[0].info.status == "FINISHED"
    cfg, modules, _, tensors = read_adapter(out / "adapter")
    assert cfg.rank == 8 and len(modules) == 14 and len(tensors) == 28
