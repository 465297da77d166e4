"""A real Slurm on this machine runs slurm/ray-cpu.sbatch with the demo config: a Ray cluster across the
(one-node) allocation, the run against it, a preemption signal mid-run that requeues the job, and the
requeued job resuming from the last checkpoint to the end, the cluster torn down each time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO_CONFIG, ROOT, TEXT_DATA, has_usable_checkpoint, outbound_connects, wait_for
from tests.mlflow_server import free_port
from tests.processes import STRACE, find_secret
from tests.slurm_cluster import SlurmCluster, missing

MISSING = missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"Slurm is not installed ({', '.join(MISSING)} missing): scripts/system-deps.sh (run by "
        "`make test`) installs Debian's slurm-wlm and munge where it runs as root with apt",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd must run as root to start jobs"),
]

SECRET = "planted-secret-5d8e2b40"
MAX_STEPS = 8


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.stop()
        pytest.skip(f"Slurm is installed but could not start here: {e}")
    yield cluster
    cluster.stop()


def _state(slurm: SlurmCluster, job_id: str) -> str:
    return slurm.job(job_id).get("JobState", "?")


@pytest.fixture(scope="module")
def preempted_job(slurm: SlurmCluster, tiny_model_dir: Path) -> Iterator[dict]:
    root = slurm.root
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-ray-"))  # short: Ray's socket paths must fit 107 bytes
    env = slurm.env | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_TMP": str(ray_tmp),
        "RAY_JOB_DIR": str(root / "job"),
        "HF_TOKEN": SECRET,
        "MLFLOW_TRACKING_TOKEN": SECRET,
    }
    out, log = root / "run", root / "job.log"
    submitted = slurm.run(
        "sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={os.cpu_count()}", f"--output={log}",
        "slurm/ray-cpu.sbatch", str(DEMO_CONFIG.relative_to(ROOT)), *TEXT_DATA,
        f"model.path={tiny_model_dir}", "model.build=null", f"train.max_steps={MAX_STEPS}",
        "checkpoint.every_n_steps=2", "train.eval_every_n_steps=0", "train.eval_max_batches=1",
        "data.max_seq_len=96", f"output.dir={out}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        env=env, cwd=ROOT,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        ended = lambda: _state(slurm, job_id) not in ("PENDING", "RUNNING")  # noqa: E731
        wait_for(lambda: has_usable_checkpoint(out / "checkpoints") or ended(), 900, "the first checkpoint")
        assert _state(slurm, job_id) == "RUNNING", log.read_text()[-3000:]
        assert not (out / "summary.json").exists(), "the run finished before the preemption signal"
        signalled = slurm.run("scancel", "--signal=USR1", "--batch", job_id)  # what --signal=B:USR1@T sends
        assert signalled.returncode == 0, signalled.stderr
        wait_for(lambda: slurm.job(job_id).get("Restarts") == "1", 120, "the requeue")
        wait_for(lambda: _state(slurm, job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 1200, "the job's end")
        yield {"id": job_id, "job": slurm.job(job_id), "out": out, "log": log.read_text(), "ray_tmp": ray_tmp}
    finally:
        slurm.run("scancel", job_id)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_requeued_job_resumes_and_finishes(preempted_job: dict) -> None:
    job, log = preempted_job["job"], preempted_job["log"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-4000:]
    assert job["Restarts"] == "1"
    assert "requeueing job" in log and "resumed from" in log.split("requeueing job", 1)[1]
    assert log.count("Ray cluster stopped") == 2, "each start tears its Ray cluster down"
    summary = json.loads((preempted_job["out"] / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS


def test_mlflow_run_continues_across_the_requeue(preempted_job: dict) -> None:
    from mlflow.tracking import MlflowClient

    summary = json.loads((preempted_job["out"] / "summary.json").read_text())
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["launcher"] == "ray"
    assert run.data.tags["restarts"] == "1", "the requeued start counts as a restart of the same launch"
    assert run.data.tags.get("slurm_job_id") == preempted_job["id"]
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the requeued job continued the run"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert max(steps) == MAX_STEPS and set(steps) == set(range(1, MAX_STEPS + 1))


def test_no_ray_process_outlives_the_job(preempted_job: dict) -> None:
    left = subprocess.run(["pgrep", "-f", str(preempted_job["ray_tmp"])], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"Ray processes still running: {left.stdout.split()}"


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it where it can)")
def test_nothing_leaves_loopback(slurm: SlurmCluster, preempted_job: dict) -> None:
    """slurmd's trace covers the job: slurmstepd, the batch script, srun, Ray, the run. A connect to
    0.0.0.0 (slurmctld answering srun at the address srun bound) reaches this host, never the network."""
    for name in ("slurmctld", "slurmd", "munged"):
        trace = slurm.root / f"{name}.strace"
        outbound = [line for line in outbound_connects(trace) if '"0.0.0.0"' not in line]
        assert outbound == [], name
    assert "AF_INET" in (slurm.root / "slurmd.strace").read_text()


def test_planted_secret_appears_nowhere(slurm: SlurmCluster, preempted_job: dict) -> None:
    assert SECRET not in preempted_job["log"]
    # The run's outputs and MLflow store (params, tags, artefacts), the job's log and files, Slurm's logs,
    # and every Ray session log of both starts. Not slurmctld's private state: sbatch hands it the job's
    # environment, which it keeps (readable by its own user only) to start the requeued job with it.
    state = slurm.root / "state"
    assert state.stat().st_mode & 0o077 == 0, "Slurm's state, holding job environments, must be private"
    written = [p for p in slurm.root.iterdir() if p != state]
    assert find_secret(SECRET, *written, preempted_job["ray_tmp"]) == []


def test_deepspeed_without_ray_trains_through_torchrun(slurm: SlurmCluster, tiny_model_dir: Path) -> None:
    """slurm/multinode-deepspeed.sbatch on the one node: torchrun starts 2 workers meeting through env://.

    It runs after the loopback check above (file order): torchrun's TCP store may look names up."""
    out, log = slurm.root / "ds-run", slurm.root / "ds.log"
    env = slurm.env | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "PROCS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
         f"--output={log}", "slurm/multinode-deepspeed.sbatch", str(DEMO_CONFIG.relative_to(ROOT)),
         f"model.path={tiny_model_dir}", "model.build=null", "distributed.use_gpu=false", "train.max_steps=3",
         "checkpoint.every_n_steps=0", "train.eval_every_n_steps=0", "train.eval_max_batches=1",
         "data.max_seq_len=96", "tracking.enabled=false", f"output.dir={out}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + (log.read_text()[-4000:] if log.exists() else "")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2
    assert "1 nodes x 2 workers, meeting at 127.0.0.1" in log.read_text()
