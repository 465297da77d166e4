"""``python -m launch submit``: the Ray Job's command line, and the configs it refuses before submitting.

Submitting for real needs the Jobs API, which Ray's full dashboard (ray[default]) serves; this
environment has the minimal one, so the job itself is not run here.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from launch import submit
from tests.conftest import DEMO_CONFIG, ROOT, run_cli
from trainer.config import ConfigError

pytestmark = pytest.mark.unit


def _args(*overrides: str, config: Path = DEMO_CONFIG, workdir: Path = ROOT) -> argparse.Namespace:
    return argparse.Namespace(config=config, overrides=list(overrides), working_dir=workdir, python="python")


def test_entrypoint_trains_the_config_relative_to_the_working_dir_on_the_joined_cluster(
    tmp_path: Path,
) -> None:
    command = submit.entrypoint(
        _args(
            f"output.dir={tmp_path}/out", f"tracking.uri=sqlite:///{tmp_path}/m.db", "tracking.run_name=a b"
        )
    )
    words = shlex.split(command)
    assert words[:5] == ["python", "-m", "launch", "train", "configs/tiny-cpu.yaml"]
    assert "tracking.run_name=a b" in words, "an override with a space survives the shell"
    assert words[-2:] == ["distributed.backend=ray", "distributed.ray_address=auto"], "the job's own cluster"


def test_outputs_that_would_vanish_with_the_job_are_refused(tmp_path: Path) -> None:
    """The demo's relative output.dir and sqlite store would land in the job's temporary copy."""
    with pytest.raises(ConfigError, match=r"output\.dir: 'runs/tiny-cpu' is relative.*tracking\.uri"):
        submit.entrypoint(_args())
    submit.entrypoint(_args(f"output.dir={tmp_path}", "tracking.uri=http://127.0.0.1:5000"))  # accepted


def test_config_outside_the_working_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must lie inside the working directory"):
        submit.entrypoint(_args(workdir=tmp_path))


def test_cli_reports_a_refused_config_without_contacting_a_cluster() -> None:
    with pytest.raises(AssertionError, match=r"\(2\):[\s\S]*output\.dir: 'runs/tiny-cpu' is relative"):
        run_cli("submit", str(DEMO_CONFIG), "--address", "http://127.0.0.1:9")
