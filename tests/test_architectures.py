"""configs/architectures/: every shipped config.json builds its model on the meta device (no weights, no
download) with the parameter count its authors publish."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

ARCHITECTURES = ROOT / "configs" / "architectures"
# Published parameter counts (billions), from each model's card.
PUBLISHED = {
    "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6,
    "mistral-7b-v0.3": 7.25, "qwen2.5-7b": 7.62, "qwen2.5-72b": 72.7, "gemma-2-9b": 9.24,
}  # fmt: skip


def test_every_directory_is_listed() -> None:
    assert {p.name for p in ARCHITECTURES.iterdir() if p.is_dir()} == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builds_on_meta_with_the_published_size(name: str) -> None:
    config = AutoConfig.from_pretrained(ARCHITECTURES / name, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], rel=0.005), f"{name}: {billions:.3f} B"
    assert all(p.device.type == "meta" for p in model.parameters())
