"""``python -m launch merge``: a plain transformers model with the adapter folded in, the unmerged logits.

The base is 4-bit NF4 (compute dtype float32, so logits can be compared tightly): the merge must rebuild
that base, dequantise it and add Delta W, giving W = dequant(W0) + Delta W, not W0 + Delta W.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests.adapter_cases import MERGEABLE, adapted, adapter_config, load_base, logits, perturb, rel_err
from tests.conftest import ROOT, run_cli, write_config
from trainer.adapters import adapter_layers
from trainer.adapters.base_layers import base_weight, is_quantized
from trainer.config import RunConfig
from trainer.export import MergeError, adapter_state_dict, merge_adapter, save_adapter
from trainer.model import quantized_digest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def base4(tiny_model_dir: Path) -> nn.Module:
    return load_base(tiny_model_dir, "nf4", torch.float32).eval()


def _trained(base4: nn.Module, method: str, tiny_model_dir: Path, out: Path) -> tuple[nn.Module, Path]:
    """An adapter with non-zero weights on the 4-bit base, saved as a run would save it."""
    model = adapted(base4, method).eval()
    perturb(model)
    save_adapter(
        adapter_state_dict(model), model, adapter_config(method), str(tiny_model_dir), out,
        quantization="nf4", dtype="fp32",
    )  # fmt: skip
    return model, out


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_model_loads_alone_with_the_unmerged_logits(
    method: str, base4: nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model, adapter_dir = _trained(base4, method, tiny_model_dir, tmp_path / "adapter")
    merge_adapter(adapter_dir, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and "auto_map" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
    assert rel_err(logits(merged), logits(model)) <= 1e-5
    assert rel_err(logits(merged), logits(base4)) > 1e-3, "the merge dropped the adapter"


@pytest.mark.integration
def test_cli_merges_a_run_directory(base4: nn.Module, tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _ = _trained(base4, "dora", tiny_model_dir, tmp_path / "run" / "adapter")
    proc = run_cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert "merged model written to" in proc.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert rel_err(logits(merged), logits(model)) <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", MERGEABLE)
def test_a_bf16_run_merges_into_a_bf16_model(method: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The demo's dtype: bf16 adapters trained on an NF4 base with bf16 compute. Each merged weight is
    bf16(dequant(W0) + Delta W), the base dequantised as the run saw it (quantised at bf16), to one bf16
    rounding; the merged model is bf16 and its logits are the unmerged ones up to bf16 rounding (measured
    0.7-1.3e-2 relative over 2 layers; the adapter itself moves them by ~1, the rounding of the absmax
    of an NF4 base quantised in float32 instead by ~1e-3)."""
    base = load_base(tiny_model_dir, "nf4", torch.bfloat16).eval()
    model = adapted(base, method, torch.bfloat16).eval()
    perturb(model)
    save_adapter(
        adapter_state_dict(model), model, adapter_config(method), str(tiny_model_dir), tmp_path / "adapter",
        quantization="nf4", dtype="bf16",
    )  # fmt: skip
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    for name, layer in adapter_layers(model):
        w0 = base_weight(layer.base_layer, torch.float32)
        want = (w0 + layer.adapter.delta_weight(w0)).to(torch.bfloat16).float()
        got = merged.get_submodule(name).weight.float()
        torch.testing.assert_close(got, want, rtol=2**-8, atol=0, msg=name)
    assert rel_err(logits(merged), logits(model)) <= 3e-2
    assert rel_err(logits(merged), logits(base)) > 0.3, "the merge dropped the adapter"


def test_merging_mosara_is_a_clear_error(base4: nn.Module, tiny_model_dir: Path, tmp_path: Path) -> None:
    _, adapter_dir = _trained(base4, "mosara", tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(MergeError, match="mosara cannot be merged: its update depends on each input token"):
        merge_adapter(adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.integration
def test_cli_refuses_mosara_with_exit_code_2(base4: nn.Module, tiny_model_dir: Path, tmp_path: Path) -> None:
    _, adapter_dir = _trained(base4, "mosara", tiny_model_dir, tmp_path / "adapter")
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "merge", str(adapter_dir), "--out", str(tmp_path / "merged")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "mosara cannot be merged" in proc.stderr


def test_not_an_adapter_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an adapter directory nor a run directory"):
        merge_adapter(tmp_path, tmp_path / "merged")


# -- the 4-bit base a merge rebuilds is the one the adapter trained on ---------------------------------


def test_the_base_digest_is_stable_and_sees_one_changed_bit(base4: nn.Module, tiny_model_dir: Path) -> None:
    again = load_base(tiny_model_dir, "nf4", torch.float32)
    assert quantized_digest(again) == quantized_digest(base4) is not None
    assert quantized_digest(adapted(base4, "lora")) == quantized_digest(base4), "wrapping moved the layers"
    layer = next(m for m in again.modules() if is_quantized(m))
    layer.weight.data.view(torch.uint8).view(-1)[0] ^= 1
    assert quantized_digest(again) != quantized_digest(base4)
    assert quantized_digest(nn.Linear(4, 4)) is None


def test_a_merge_refuses_a_base_requantised_to_other_bits(
    base4: nn.Module, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run on a GPU quantised its base with bitsandbytes' CUDA kernel; a merge on a CPU re-quantises
    with another. Same bits: the merge goes on; other bits: an error naming both, unless allowed."""
    model = adapted(base4, "lora").eval()
    perturb(model)
    for name, digest in (("same", quantized_digest(base4)), ("other", "0" * 64)):
        save_adapter(
            adapter_state_dict(model), model, adapter_config("lora"), str(tiny_model_dir), tmp_path / name,
            quantization="nf4", dtype="fp32", base_digest=digest, quantized_on="cuda",
        )  # fmt: skip
    merge_adapter(tmp_path / "same", tmp_path / "merged-same")
    expected = r"differs from the one the adapter was trained on \(quantised on cuda, sha256 000000000000\)"
    with pytest.raises(MergeError, match=expected + r".*--device cuda.*--allow-base-mismatch"):
        merge_adapter(tmp_path / "other", tmp_path / "merged-other")
    assert not (tmp_path / "merged-other").exists()
    merge_adapter(tmp_path / "other", tmp_path / "merged-anyway", allow_base_mismatch=True)
    assert (tmp_path / "merged-anyway" / "config.json").is_file()
    assert "merging anyway" in caplog.text


@pytest.mark.integration
def test_a_trained_4bit_run_records_its_base_and_merges_against_it(
    make_config: Callable[..., RunConfig], base4: nn.Module, tmp_path: Path
) -> None:
    cfg = make_config("model.quantization=nf4", "train.max_steps=2", "train.eval_every_n_steps=0")
    run_cli("train", str(write_config(cfg, tmp_path / "run.yaml")))
    meta_path = Path(cfg.output.dir) / "adapter" / "riemann_tune.json"
    meta = json.loads(meta_path.read_text())
    assert meta["base_digest"] == quantized_digest(base4) and meta["quantized_on"] == "cpu"
    run_cli("merge", cfg.output.dir, "--out", str(tmp_path / "merged"))
    meta_path.write_text(json.dumps({**meta, "base_digest": "f" * 64}))
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "merge", cfg.output.dir, "--out", str(tmp_path / "merged-other")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "--allow-base-mismatch" in proc.stderr, proc.stderr[-3000:]
