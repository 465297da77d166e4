"""The streaming loader under DeepSpeed, 2 processes over gloo: it trains exactly like today's
``from_pretrained`` path, and under ZeRO-3 the base is partitioned while it loads.

One launch of tests/zero_harness.py runs every configuration twice, once through each loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_preconditioner_distributed import FP32_ATOL, _harness

pytestmark = pytest.mark.integration

CASES = [(stage, quant) for stage in (2, 3) for quant in ("none", "nf4")]


def _name(stage: int, quant: str, loader: str) -> str:
    return f"s{stage}-{quant}-{loader}"


@pytest.fixture(scope="module")
def results(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stream")
    configs = [
        {
            "name": _name(stage, quant, loader),
            "stage": stage,
            "quant": quant,
            "loader": loader,
            "logits": True,
        }
        for stage, quant in CASES
        for loader in ("stream", "pretrained")
    ]
    configs.append({"name": "s3-nf4-stream-chunked", "stage": 3, "quant": "nf4", "chunk": 7})
    _harness(tiny_model_dir, out, world=2, accum=2, configs=configs)
    return out


def _record(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize(("stage", "quant"), CASES)
def test_streamed_run_equals_the_from_pretrained_run(results: Path, stage: int, quant: str) -> None:
    """Logits before training and adapter weights after 3 steps (measured: both 0.0 apart; the bar is
    the ZeRO tests' fp32 tolerance, far below the ~1e-2 a wrong seed or layer order would move them)."""
    new, old = _name(stage, quant, "stream"), _name(stage, quant, "pretrained")
    logits_new = load_file(str(results / f"{new}.logits.safetensors"))["logits"]
    logits_old = load_file(str(results / f"{old}.logits.safetensors"))["logits"]
    torch.testing.assert_close(logits_new, logits_old, rtol=0, atol=1e-6)
    got, want = load_file(str(results / f"{new}.safetensors")), load_file(str(results / f"{old}.safetensors"))
    assert got.keys() == want.keys() and len(got) == 28
    assert max(t.abs().max().item() for k, t in got.items() if "lora_B" in k) > 1e-3, "did not train"
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=FP32_ATOL, msg=f"{new}: {key}")


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_zero3_base_is_partitioned_while_loading_and_not_again(results: Path, quant: str) -> None:
    """After loading, a ZeRO-3 rank holds no base parameter whole (today's path: all of them), and
    deepspeed.initialize broadcasts nothing (today's path broadcasts the whole model there). The
    embedding and head are no parameters at all: each rank holds its rows (trainer/model/vocab.py)."""
    new, old = _record(results, _name(3, quant, "stream")), _record(results, _name(3, quant, "pretrained"))
    assert new["whole_after_load"] == 0 and old["whole_after_load"] > 0
    # the embedding and head are split by vocabulary rows (so the equality tests above cover them)
    assert new["vocab_sharded"] == ["model.embed_tokens", "lm_head"] and old["vocab_sharded"] == []
    assert new["total_params"] == old["total_params"]
    assert new["load_bytes"].get("broadcast", 0) > 0, "nothing was partitioned during loading"
    assert "broadcast" not in new["init_bytes"] and old["init_bytes"].get("broadcast", 0) > 0


def test_zero2_keeps_the_base_whole_as_before(results: Path) -> None:
    new, old = _record(results, _name(2, "nf4", "stream")), _record(results, _name(2, "nf4", "pretrained"))
    assert new["whole_after_load"] == old["whole_after_load"] > 0
    assert new["init_bytes"] == old["init_bytes"]


def test_chunked_loss_trains_like_the_whole_loss_under_zero3(results: Path) -> None:
    """7-token chunks of the vocabulary-sharded loss: same adapters within the ZeRO tests' fp32
    bar (measured 1.3e-4 after 3 steps: float32 sums reordered, amplified by Adam as in those tests)."""
    got = load_file(str(results / "s3-nf4-stream-chunked.safetensors"))
    want = load_file(str(results / f"{_name(3, 'nf4', 'stream')}.safetensors"))
    assert got.keys() == want.keys() and len(got) == 28
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=FP32_ATOL, msg=key)


@pytest.fixture(scope="module")
def tied_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2: the head is the embedding (tied), its layers are Conv1D, its position embedding is an
    nn.Embedding that is not the vocabulary's."""
    from tests.test_stream import _tiny

    out = tmp_path_factory.mktemp("tied")
    cls, config = _tiny("gpt2")
    torch.manual_seed(0)
    cls(config).save_pretrained(out / "gpt2")
    configs = [{"name": f"gpt2-{loader}", "stage": 3, "quant": "nf4", "loader": loader, "logits": True}
               for loader in ("stream", "pretrained")]  # fmt: skip
    _harness(out / "gpt2", out, world=2, accum=2, configs=configs)
    return out


def test_a_tied_head_is_split_once_and_trains_like_the_gathered_one(tied_results: Path) -> None:
    new, old = _record(tied_results, "gpt2-stream"), _record(tied_results, "gpt2-pretrained")
    assert new["vocab_sharded"] == ["transformer.wte", "lm_head"] and old["vocab_sharded"] == []
    assert new["total_params"] == old["total_params"]
    logits = [
        load_file(str(tied_results / f"gpt2-{x}.logits.safetensors"))["logits"]
        for x in ("stream", "pretrained")
    ]
    torch.testing.assert_close(*logits, rtol=0, atol=1e-6)
    got, want = (load_file(str(tied_results / f"gpt2-{x}.safetensors")) for x in ("stream", "pretrained"))
    assert got.keys() == want.keys() and got
    assert max(t.abs().max().item() for k, t in got.items() if "lora_B" in k) > 1e-3, "did not train"
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=FP32_ATOL, msg=key)
