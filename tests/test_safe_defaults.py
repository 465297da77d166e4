"""Network defaults that keep a cluster closed (CVE-2023-48022): loopback detection without name
lookups, Ray addresses as Ray resolves them, and every server command the project ships on 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch.env import is_loopback, ray_address_host
from tests.conftest import ROOT
from trainer.config import DistributedConfig

pytestmark = pytest.mark.unit

SHIPPED = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "slurm").iterdir(), *(ROOT / "docker").iterdir()]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.4.5.6", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("10.0.0.5", False), ("head-node", False), ("", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_ray_address_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address_host("10.1.2.3:6379") == "10.1.2.3"
    assert ray_address_host("ray://head:10001") == "head"
    assert ray_address_host("auto") is None, "no RAY_ADDRESS, no cluster recorded: Ray decides"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:41234\n")
    assert ray_address_host("auto") == "127.0.0.1", "the cluster `ray start` recorded"
    monkeypatch.setenv("RAY_ADDRESS", "192.168.1.7:6379")
    assert ray_address_host("auto") == "192.168.1.7", "RAY_ADDRESS wins, as in Ray"


def test_config_defaults_keep_the_dashboard_off_and_on_loopback() -> None:
    d = DistributedConfig()
    assert d.ray_dashboard is False and d.ray_dashboard_host == "127.0.0.1"


def _commands(pattern: str) -> list[tuple[str, str]]:
    """(file, command) for every shipped command line matching ``pattern``, with its continuation lines."""
    found = []
    for path in SHIPPED:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # join shell continuation lines
        found += [(path.name, line) for line in text.splitlines() if re.search(pattern, line)]
    return found


def test_every_mlflow_server_binds_loopback() -> None:
    commands = _commands(r"mlflow\"?,? \"?(ui|server)\b")
    assert commands, "no MLflow UI command found: is the pattern stale?"
    for name, line in commands:
        assert re.search(r"--host\"?,? \"?127\.0\.0\.1", line), f"{name}: {line.strip()}"


def test_every_ray_head_binds_its_dashboard_to_a_configured_loopback_default() -> None:
    heads = _commands(r"ray start --head")
    assert heads, "no ray start --head found in the scripts"
    for name, line in heads:
        assert "--dashboard-host=" in line, f"{name}: {line.strip()}"
    assert re.search(r"RAY_DASHBOARD_HOST:=127\.0\.0\.1", (ROOT / "slurm" / "ray-cluster.sh").read_text())


def test_nothing_shipped_binds_every_interface() -> None:
    for path in SHIPPED:
        assert "0.0.0.0" not in path.read_text(), path.name


def test_a_local_ray_cluster_keeps_the_users_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray's processes get a HOME of their own; DeepSpeed's compiled op and the datasets cache stay put."""
    import os

    from torch.utils.cpp_extension import get_default_build_root

    from launch.ray_job import _local_cluster_home

    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with _local_cluster_home(tmp_path / "run"):
        assert os.environ["HOME"] == str(tmp_path / "run" / "ray-home")
        assert Path(get_default_build_root()).is_relative_to(tmp_path / "user" / ".cache")
    assert os.environ["HOME"] == str(tmp_path / "user")


def test_ray_checkpoint_staging_leaves_nothing_in_tmp() -> None:
    """Each Ray worker stages its shards in a node-local temp dir, removed when the worker finishes."""
    from launch.ray_job import RaySink

    with RaySink(hashes=False) as sink:
        staged = sink.staging_dir(3)
        staged.mkdir()
        assert staged.parent.is_dir()
    assert not staged.parent.exists()
