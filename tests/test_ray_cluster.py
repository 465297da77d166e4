"""A Ray cluster of two nodes on this machine, joined by a run (distributed.ray_address): its 2 workers
spread over both nodes, the second node dies mid-run, and the run resumes on what is left and finishes.

The head is a real ``ray start --head``; the second node is started as ``ray.cluster_utils.Cluster`` does
(tests/ray_node.py says why not ``ray start --address``); tests/ray_hold.py holds one of the head's CPUs
while the run places its workers, so they must use both nodes. Everything keeps to 127.0.0.1, and strace
checks it; a secret planted in the environment must show up in no log, output or MLflow record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_CONFIG, ROOT, TEXT_DATA, has_usable_checkpoint, outbound_connects, wait_for
from tests.mlflow_server import free_port
from tests.processes import STRACE, Daemon, find_secret, traced

pytestmark = pytest.mark.slow

SECRET = "planted-secret-7f3c9a1e"  # as HF_TOKEN and MLFLOW_TRACKING_TOKEN of every process here
RAY = Path(sys.executable).parent / "ray"
MAX_STEPS = 16


@dataclass
class RayCluster:
    root: Path
    env: dict[str, str]
    head: Daemon
    second: Daemon
    second_id: str
    address: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    root = tmp_path_factory.mktemp("raycl")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-ray-"))  # short: Ray's socket paths must fit 107 bytes
    home = root / "home"  # a local provider: Ray's dashboard then probes no cloud metadata address
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_TOKEN": SECRET,
        "MLFLOW_TRACKING_TOKEN": SECRET,
    }
    gcs, dashboard, agent = free_port(), free_port(), free_port()  # other Ray clusters may share this host
    head = Daemon(
        [*traced(root / "head.strace"), RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--num-cpus=2", f"--temp-dir={ray_tmp}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
        root / "head.log", env,
    )  # fmt: skip
    second = None
    try:
        current = ray_tmp / "ray_current_cluster"  # written once the head is up
        wait_for(current.is_file, 180, "the Ray head", head.proc)
        address = current.read_text().strip()
        assert address == f"127.0.0.1:{gcs}"
        node_id = root / "second.id"
        second = Daemon(
            [*traced(root / "second.strace"), sys.executable, ROOT / "tests" / "ray_node.py",
             address, node_id, "1"],
            root / "second.log", env,
        )  # fmt: skip
        wait_for(node_id.is_file, 180, "the second node to join", second.proc)
        # The node exists before its resources reach the head's scheduler: a placement group made in
        # between sees one node and SPREAD (best effort) puts both workers on the head.
        wait_for(lambda: _status_shows(address, env, " second_node"), 180, "the head to see the second node")
        yield RayCluster(root, env, head, second, node_id.read_text().strip(), address)
    finally:
        if second is not None:
            second.kill()
        head.stop(grace_s=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _status_shows(address: str, env: dict[str, str], text: str) -> bool:
    status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True)
    return text in status.stdout


@pytest.fixture(scope="module")
def killed_run(cluster: RayCluster, tiny_model_dir: Path) -> tuple[Path, str]:
    """The demo config on both nodes; the second node is killed after the first checkpoint."""
    out = cluster.root / "run"
    held = cluster.root / "held"
    hold_cmd = [sys.executable, ROOT / "tests" / "ray_hold.py", cluster.address, held]
    hold = Daemon(hold_cmd, cluster.root / "hold.log", cluster.env)
    run = None
    try:
        wait_for(held.is_file, 180, "a CPU of the head to be held", hold.proc)
        run = Daemon(
            [*traced(cluster.root / "driver.strace"), sys.executable, "-m", "launch", "train",
             str(DEMO_CONFIG), *TEXT_DATA, f"model.path={tiny_model_dir}", "model.build=null",
             "distributed.num_workers=2", "distributed.placement_strategy=SPREAD",
             "distributed.max_failures=1",
             f"train.max_steps={MAX_STEPS}", "checkpoint.every_n_steps=2", "train.eval_every_n_steps=0",
             "train.eval_max_batches=1", "data.max_seq_len=96", f"output.dir={out}",
             f"tracking.uri=sqlite:///{cluster.root / 'mlflow.db'}",
             f"distributed.ray_address={cluster.address}"],
            cluster.root / "driver.log", cluster.env,
        )  # fmt: skip
        wait_for(lambda: has_usable_checkpoint(out / "checkpoints"), 900, "the first checkpoint", run.proc)
        # Each node's log monitor forwards its workers' lines when it next polls: a node killed before
        # then takes its rank's placement line with it (seen on a loaded machine).
        placed = re.compile(r"riemann-tune: rank 1 of 2 on Ray node")
        wait_for(lambda: placed.search(run.log.read_text()), 120, "both ranks' placement lines", run.proc)
        assert not (out / "summary.json").exists(), "the run finished before the node could be killed"
        hold.kill()  # the head's 2 CPUs free for the restart, both workers on it
        freed = " 2.0/3.0 CPU"  # the run's 2 workers only
        wait_for(lambda: _status_shows(cluster.address, cluster.env, freed), 180, "the held CPU back")
        cluster.second.kill()  # raylet, its workers and all: a node lost without warning
        run.proc.wait(timeout=900)
    finally:
        hold.kill()
        if run is not None:
            run.kill()
    assert run is not None
    log = run.log.read_text()
    assert run.proc.returncode == 0, log[-5000:]
    return out, log


def test_workers_spread_over_both_nodes_through_a_file_store(cluster: RayCluster, killed_run: tuple) -> None:
    _, log = killed_run
    reports = re.findall(r"riemann-tune: rank (\d) of 2 on Ray node (\w+)", log)
    placed = dict(reports[:2])  # the first attempt; the restart reports again
    assert set(placed) == {"0", "1"}, f"not every rank reported its node: {reports}"
    assert len(set(placed.values())) == 2 and cluster.second_id in placed.values(), reports
    head = (set(placed.values()) - {cluster.second_id}).pop()
    assert [node for _, node in reports[2:]] == [head, head], f"the restart is not on the head: {reports}"
    assert "every node of the Ray cluster is on this machine: workers meet through a file store" in log


def test_losing_a_node_ends_in_a_resumed_finished_run(killed_run: tuple) -> None:
    from mlflow.tracking import MlflowClient

    out, log = killed_run
    assert "resumed from" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["world_size"] == 2
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "1"
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the restart continued the same run"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert max(m.step for m in losses) == MAX_STEPS


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it where it can)")
def test_no_process_connects_beyond_loopback(cluster: RayCluster, killed_run: tuple) -> None:
    """Head (and every worker under it), second node, the run's driver."""
    for name in ("head", "second", "driver"):
        trace = cluster.root / f"{name}.strace"
        assert "AF_INET" in trace.read_text(), f"strace saw no socket of the {name}"
        assert outbound_connects(trace) == [], name


def test_planted_secret_appears_nowhere(cluster: RayCluster, killed_run: tuple) -> None:
    _, log = killed_run
    assert SECRET not in log
    # Everything the cluster and the run wrote: outputs, checkpoints, MLflow's store and artefacts (params
    # and tags included), Ray's session logs of every process, the driver's and head's output.
    assert find_secret(SECRET, cluster.root) == []
