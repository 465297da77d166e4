"""The speed switches change no result: regional torch.compile against eager, on full-precision and NF4
bases and more than one adapter method; Liger refused, naming the field, where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig
from trainer.model import prepare_model
from trainer.model.speed import decoder_layers

CPU = torch.device("cpu")
IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(5))


def _config(model: Path, *overrides: str) -> RunConfig:
    raw = {"model": {"path": str(model)}, "data": {"train_path": "unused"}, "output": {"dir": "unused"},
           "distributed": {"use_gpu": False}}  # fmt: skip
    return config_lib.validate(config_lib.apply_overrides(raw, list(overrides)))


def _losses(cfg: RunConfig, steps: int = 3) -> list[float]:
    model = prepare_model(cfg, CPU)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# (overrides, tolerance on the loss): float32 agrees to rounding; bf16 compute to bf16's, as fused
# kernels round in another order
CASES = {
    "lora-fp32": (("adapter.method=lora",), 1e-4),
    "lora-nf4-bf16": (("adapter.method=lora", "model.quantization=nf4", "train.dtype=bf16"), 2e-2),
    "dora-bf16": (("adapter.method=dora", "train.dtype=bf16"), 2e-2),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_layers_train_like_eager(tiny_model_dir: Path, case: str) -> None:
    from torch._dynamo.utils import counters

    overrides, tolerance = CASES[case]
    eager = _losses(_config(tiny_model_dir, *overrides))
    torch._dynamo.reset()
    counters.clear()
    cfg = _config(tiny_model_dir, *overrides, "train.compile=true")
    compiled = _losses(cfg)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert compiled == pytest.approx(eager, abs=tolerance)
    assert eager[-1] < eager[0]  # it trained: the comparison is between moving losses


@pytest.mark.unit
def test_compile_wraps_every_decoder_layer_and_keeps_the_names(tiny_model_dir: Path) -> None:
    plain = prepare_model(_config(tiny_model_dir), CPU)
    compiled = prepare_model(_config(tiny_model_dir, "train.compile=true"), CPU)
    layers = decoder_layers(compiled)
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.unit
def test_a_bad_compile_value_names_the_field(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.compile"):
        _config(tiny_model_dir, "train.compile=sometimes")


@pytest.mark.unit
def test_liger_on_the_cpu_is_one_error_naming_the_field(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.liger: Liger kernels are Triton kernels for CUDA") as e:
        _config(tiny_model_dir, "train.liger=true")
    assert str(e.value).count("\n  ") == 1  # one error, not one per check that could have failed
    # GPU left to auto-detection: refused when the model is loaded on the CPU
    cfg = _config(tiny_model_dir, "train.liger=true", "distributed.use_gpu=null")
    with pytest.raises(ConfigError, match=r"train\.liger: .* trains on cpu"):
        prepare_model(cfg, CPU)
