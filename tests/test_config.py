"""Config: every shipped file validates; bad input names the file and the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer import config as config_lib
from trainer.config import ConfigError

pytestmark = pytest.mark.unit

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    assert CONFIGS, "configs/ holds no YAML file"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    cfg = config_lib.load(path)
    assert cfg.train.max_steps > 0


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BASE = "model: {path: m}\ndata: {train_path: t.jsonl}\noutput: {dir: out}\n"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("adapter: {rank: 0}", "adapter.rank: must be > 0"),
        ("optim: {lr: -1}", "optim.lr: must be > 0"),
        ("adapter: {ranks: 8}", "adapter.ranks: unknown field"),
        ("distributed: {zero_stage: 5}", "distributed.zero_stage:"),
        ("train: {dtype: fp8}", "train.dtype:"),
        ("optim: {preconditioner: kfac}", "optim.preconditioner:"),
    ],
)
def test_bad_field_is_named_with_file(tmp_path: Path, extra: str, expected: str) -> None:
    path = _write(tmp_path, BASE + extra + "\n")
    with pytest.raises(ConfigError) as err:
        config_lib.load(path)
    assert f"{path}: {expected}" in str(err.value)


def test_missing_section_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: {path: m}\noutput: {dir: out}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: data: is required"):
        config_lib.load(path)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_lib.load(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_lib.load(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        config_lib.load(tmp_path / "absent.yaml")


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    cfg = config_lib.load(
        path, ["adapter.rank=16", "optim.lr=3e-4", "train.dtype=bf16", "data.eval_path=null"]
    )
    assert (cfg.adapter.rank, cfg.optim.lr, cfg.train.dtype, cfg.data.eval_path) == (16, 3e-4, "bf16", None)
    with pytest.raises(ConfigError, match=r"adapter\.rank: must be > 0") as err:
        config_lib.load(path, ["adapter.rank=-2"])
    assert "with overrides adapter.rank=-2" in str(err.value)
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        config_lib.load(path, ["adapter.rank"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config_lib.load(ROOT / "configs" / "tiny-cpu.yaml")
    again = _write(tmp_path, config_lib.to_yaml(cfg))
    assert config_lib.load(again) == cfg
    flat = config_lib.flatten(cfg)
    assert flat["adapter.rank"] == "8" and flat["distributed.backend"] == "ray"


def test_global_batch_size() -> None:
    cfg = config_lib.load(ROOT / "configs" / "tiny-cpu.yaml", ["train.grad_accum_steps=3"])
    assert cfg.global_batch_size == cfg.train.micro_batch_size * 3 * cfg.distributed.num_workers
