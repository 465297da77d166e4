"""The built-in tiny base: built once at model.path, reused only while model.build still describes it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO_CONFIG, ROOT
from trainer.config import TinyModelSpec
from trainer.model import StaleModelError, ensure_tiny_model

pytestmark = pytest.mark.unit

SHAPE = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
         "vocab_size": 300}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyModelSpec]:
    """A model built from a corpus copied into its own directory (so a test may edit the copy)."""
    tmp = tmp_path_factory.mktemp("tiny")
    corpus = tmp / "corpus.jsonl"
    shutil.copy(ROOT / "data" / "tiny" / "train.jsonl", corpus)
    spec = TinyModelSpec(**SHAPE, tokenizer_corpus=[str(corpus)])
    assert ensure_tiny_model(str(tmp / "model"), spec)
    return tmp / "model", spec


def test_the_same_spec_reuses_the_model(built: tuple[Path, TinyModelSpec], tmp_path: Path) -> None:
    path, spec = built
    assert not ensure_tiny_model(str(path), spec)
    # the corpus at another path with the same contents (another checkout sharing the cache): reused
    elsewhere = tmp_path / "train.jsonl"
    shutil.copy(spec.tokenizer_corpus[0], elsewhere)
    assert not ensure_tiny_model(str(path), spec.model_copy(update={"tokenizer_corpus": [str(elsewhere)]}))


@pytest.mark.parametrize(
    ("change", "named"),
    [({"hidden_size": 32}, "hidden_size: built with 16, model.build asks for 32"),
     ({"pretrain_steps": 5}, "pretrain_steps: built with 0, model.build asks for 5"),
     ({"seed": 1}, "seed: built with 0, model.build asks for 1")],
)  # fmt: skip
def test_a_changed_spec_is_refused_by_name(
    built: tuple[Path, TinyModelSpec], change: dict[str, int], named: str
) -> None:
    path, spec = built
    before = (path / "model.safetensors").stat().st_mtime_ns
    stale = rf"model\.path: {path} was built from another model\.build"
    with pytest.raises(StaleModelError, match=stale) as e:
        ensure_tiny_model(str(path), spec.model_copy(update=change))
    assert named in str(e.value) and f"delete {path} to rebuild it" in str(e.value)
    assert (path / "model.safetensors").stat().st_mtime_ns == before, "the refused model must stay as it was"


def test_a_changed_corpus_is_refused(built: tuple[Path, TinyModelSpec], tmp_path: Path) -> None:
    path, spec = built
    edited = tmp_path / "train.jsonl"
    original = Path(spec.tokenizer_corpus[0]).read_text()
    edited.write_text(original + json.dumps({"text": "one more row"}) + "\n")
    with pytest.raises(
        StaleModelError, match="tokenizer_corpus: the files' contents differed when it was built"
    ):
        ensure_tiny_model(str(path), spec.model_copy(update={"tokenizer_corpus": [str(edited)]}))


def test_a_model_built_by_other_builder_code_is_refused(
    built: tuple[Path, TinyModelSpec], tmp_path: Path
) -> None:
    """A cache built before the code that makes the weights changed (the spec alone would not tell)."""
    path, spec = built
    older = tmp_path / "older"
    shutil.copytree(path, older)
    record = json.loads((older / "spec.json").read_text())
    (older / "spec.json").write_text(json.dumps({**record, "builder_sha256": "0" * 64}))
    with pytest.raises(StaleModelError, match=r"trainer/model/tiny\.py: the code that builds it differed"):
        ensure_tiny_model(str(older), spec)


def test_a_model_recorded_before_the_digests_is_checked_on_its_spec(
    built: tuple[Path, TinyModelSpec], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache written by the builder before spec.json held digests: the spec alone, paths included."""
    path, spec = built
    older = tmp_path / "older"
    shutil.copytree(path, older)
    (older / "spec.json").write_text(spec.model_dump_json())
    assert not ensure_tiny_model(str(older), spec)
    assert "only its spec could be checked" in caplog.text
    with pytest.raises(StaleModelError, match=r"num_layers: built with 1, model\.build asks for 2"):
        ensure_tiny_model(str(older), spec.model_copy(update={"num_layers": 2}))


def test_a_model_not_built_from_a_spec_is_refused(built: tuple[Path, TinyModelSpec], tmp_path: Path) -> None:
    path, spec = built
    foreign = tmp_path / "foreign"
    shutil.copytree(path, foreign)
    (foreign / "spec.json").unlink()
    with pytest.raises(StaleModelError, match=r"holds a model that model\.build did not build"):
        ensure_tiny_model(str(foreign), spec)


@pytest.mark.integration
def test_cli_refuses_a_stale_model_with_exit_code_2(
    built: tuple[Path, TinyModelSpec], tmp_path: Path
) -> None:
    """What the demo (and the golden-loss test, which runs it) meets on a cache built from another spec."""
    path, _ = built
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "train", str(DEMO_CONFIG), f"model.path={path}",
         "distributed.backend=local", "distributed.num_workers=1", f"output.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "was built from another model.build (hidden_size: built with 16" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
