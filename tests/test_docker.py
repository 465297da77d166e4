"""The Docker files, linted here since Docker cannot build on this machine: they parse, every COPY source
exists, their pins are the project's, they bake in no secret and run as a user; compose binds loopback."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
PINNED = ("torch", "deepspeed", "bitsandbytes", "ray", "mlflow")


def _instructions(path: Path) -> list[dict]:
    with path.open("rb") as f:
        return [s for s in DockerfileParser(fileobj=f).structure if s["instruction"] != "COMMENT"]


def _project_pins() -> dict[str, str]:
    """name -> version of every ``==`` pin in pyproject.toml, plus the Makefile's torch."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = {
        m[1].lower(): m[2] for m in re.finditer(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', pyproject)
    }
    pins["torch"] = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    return pins


def test_there_are_a_cuda_and_a_cpu_image() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cuda", "Dockerfile.cpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_and_copies_only_existing_paths(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    assert steps and steps[0]["instruction"] == "FROM", "a Dockerfile starts with FROM"
    base = steps[0]["value"]
    assert ":" in base and not base.endswith(":latest"), f"base image {base!r} must carry a fixed tag"
    copies = [s for s in steps if s["instruction"] in ("COPY", "ADD")]
    assert copies, "the project is never copied in"
    for step in copies:
        assert step["instruction"] == "COPY", f"line {step['startline']}: use COPY, not ADD (no URLs)"
        words = [w for w in shlex.split(step["value"]) if not w.startswith("--")]
        for source in words[:-1]:  # the last word is the destination
            assert (ROOT / source).exists(), f"{dockerfile.name}:{step['startline'] + 1}: no {source}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_the_projects_versions(dockerfile: Path) -> None:
    runs = " ".join(s["value"] for s in _instructions(dockerfile) if s["instruction"] == "RUN")
    found = {
        m[1].lower(): m[2] for m in re.finditer(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][\w.]*)", runs)
    }
    pins = _project_pins()
    for name in PINNED:
        assert name in found, f"{dockerfile.name} does not pin {name}"
    for name, version in found.items():
        assert version == pins.get(name), (
            f"{dockerfile.name}: {name}=={version}, the project pins {pins.get(name)}"
        )
    assert re.search(r"pip install -c \S+ \.", runs), "the project itself is not installed (constrained)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_holds_no_secret_and_drops_root(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    for step in steps:
        if step["instruction"] in ("ARG", "ENV"):
            names = [word.split("=", 1)[0] for word in step["value"].split()]
            secrets = [n for n in names if re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY)$", n, re.I)]
            assert not secrets, (
                f"{dockerfile.name}:{step['startline'] + 1}: {secrets} belong in `docker run -e`"
            )
    users = [s["value"] for s in steps if s["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as an unprivileged user"
    env = " ".join(s["value"] for s in steps if s["instruction"] == "ENV")
    for offline in ("HF_HUB_OFFLINE=1", "RAY_USAGE_STATS_ENABLED=0", "MLFLOW_DISABLE_TELEMETRY=true"):
        assert offline in env, f"{dockerfile.name} does not set {offline}"


def test_compose_builds_existing_files_and_binds_loopback() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    built = [s["build"] for s in compose["services"].values() if "build" in s]
    assert built
    for build in built:
        context = (ROOT / "docker" / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).is_file()
    for name, service in compose["services"].items():
        command = service.get("command", [])
        command = shlex.split(command) if isinstance(command, str) else command
        if "mlflow" in command:
            assert command[command.index("--host") + 1] == "127.0.0.1", f"compose service {name}"
            assert service.get("network_mode") == "host", f"{name}: 127.0.0.1 must be the host's loopback"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (
                f"compose service {name} publishes {port} beyond loopback"
            )


def test_dockerignore_keeps_environments_and_outputs_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".cache", "runs", ".git"} <= set(ignored)
