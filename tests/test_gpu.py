"""What only an NVIDIA GPU can show; skipped with the reason everywhere else (tests/conftest.py).

- the preconditioner's gradient hooks never synchronise the device with the host (per pair, as under
  ZeRO-3, and batched), checked by torch.cuda.set_sync_debug_mode("error");
- bitsandbytes' CUDA quantiser against its CPU one, and a merge's answer to the difference;
- a Ray run on the GPU: Ray's device for the worker, DeepSpeed on CUDA although the launching process
  says DS_ACCELERATOR=cpu (conftest sets it), the allocator's reserve logged, the base digest recorded;
- the allocator's reserve next to its allocated peak.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import run_cli, write_config
from trainer.config import RunConfig

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)


@pytest.fixture()
def no_host_sync() -> Iterator[None]:
    """Inside: an operation that synchronises the GPU with the host raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _adapted_on_gpu(partitioned: bool) -> nn.Module:
    from trainer.adapters import adapter_layers, freeze_base, inject_adapters
    from trainer.config import AdapterConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 32))
    inject_adapters(model, AdapterConfig(rank=8, target_modules=["0", "2"]))
    freeze_base(model)
    for i, (_, layer) in enumerate(adapter_layers(model)):
        nn.init.normal_(layer.adapter.lora_B)
        if partitioned:  # what the preconditioner reads as "ZeRO-3 partitions it": one pair at a time
            for j, p in enumerate(layer.adapter.parameters()):
                p.ds_id = 2 * i + j  # type: ignore[attr-defined]
    return model.to(CUDA)


@pytest.mark.parametrize("partitioned", [False, True], ids=["batched", "per-pair"])
def test_preconditioner_hooks_never_sync_the_gpu(partitioned: bool, no_host_sync: None) -> None:
    from trainer.optim import RiemannianPreconditioner

    model = _adapted_on_gpu(partitioned)
    pre = RiemannianPreconditioner(delta=1e-2)
    pre.attach(model)
    x = torch.randn(16, 64, device=CUDA)
    for _ in range(2):
        model(x).pow(2).sum().backward()
    torch.cuda.set_sync_debug_mode("default")
    assert pre.factorisations == (2 if partitioned else 1) and pre.fallbacks == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.isfinite().all() for g in grads)


def test_the_sync_free_inverse_on_the_gpu_equals_the_float64_inverse() -> None:
    from trainer.optim.riemannian import inverse_from_cholesky

    a = torch.randn(12, 8, 24, dtype=torch.float64)
    grams = a @ a.mT + 1e-2 * torch.eye(8, dtype=torch.float64)
    chol = torch.linalg.cholesky(grams.float().to(CUDA))
    got = inverse_from_cholesky(chol).double().cpu()
    assert torch.allclose(got, torch.linalg.inv(grams), rtol=1e-4, atol=1e-5)


def test_cuda_and_cpu_quantisers_and_the_merges_answer(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Records whether bitsandbytes' CUDA and CPU NF4 quantisers give the same bits here; either way a
    merge on the training device passes, and one on the CPU passes exactly when the bits agree."""
    from tests.adapter_cases import adapted, adapter_config, perturb
    from trainer.config import ModelConfig
    from trainer.export import MergeError, adapter_state_dict, merge_adapter, save_adapter
    from trainer.model import load_base_model, quantized_digest

    cfg = ModelConfig(path=str(tiny_model_dir), quantization="nf4")
    on_gpu = load_base_model(cfg, torch.float32, CUDA)
    on_cpu = load_base_model(cfg, torch.float32, torch.device("cpu"))
    digest_gpu, digest_cpu = quantized_digest(on_gpu), quantized_digest(on_cpu)
    model = adapted(on_gpu, "lora")
    perturb(model)
    save_adapter(
        adapter_state_dict(model), model, adapter_config("lora"), str(tiny_model_dir), tmp_path / "adapter",
        quantization="nf4", dtype="fp32", base_digest=digest_gpu, quantized_on="cuda",
    )  # fmt: skip
    merge_adapter(tmp_path / "adapter", tmp_path / "merged-gpu", device="cuda")
    print(f"bitsandbytes NF4 CUDA vs CPU: bit-identical = {digest_gpu == digest_cpu}")
    if digest_gpu == digest_cpu:
        merge_adapter(tmp_path / "adapter", tmp_path / "merged-cpu")
    else:
        with pytest.raises(MergeError, match="--allow-base-mismatch"):
            merge_adapter(tmp_path / "adapter", tmp_path / "merged-cpu")


def test_memory_metrics_report_the_allocators_reserve(tmp_path: Path) -> None:
    import torch.distributed as dist

    from trainer.tracking import memory_metrics

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        block = torch.empty(64 * 2**20, dtype=torch.float32, device=CUDA)  # 256 MiB
        del block
        metrics = memory_metrics(CUDA)
    finally:
        dist.destroy_process_group()
    assert metrics["system/memory_peak_reserved_mb"] >= metrics["system/memory_peak_mb"] >= 256
    assert metrics["peak_memory_reserved_mb.rank0"] == metrics["peak_memory_reserved_mb"]


@pytest.mark.slow
def test_a_ray_run_trains_on_rays_gpu(make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    """One Ray worker on one GPU (use_gpu null: the cluster has GPUs), 4-bit base in bf16."""
    cfg = make_config(
        "distributed.backend=ray", "distributed.use_gpu=null", "distributed.num_workers=1",
        "model.quantization=nf4", "train.dtype=bf16", "train.max_steps=3", "train.eval_every_n_steps=0",
    )  # fmt: skip
    proc = run_cli("train", str(write_config(cfg, tmp_path / "run.yaml")))
    out = Path(cfg.output.dir)
    assert "on cuda:0" in proc.stdout + proc.stderr, "the worker did not train on Ray's GPU"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reserved = [r["peak_memory_reserved_mb"] for r in rows if "peak_memory_reserved_mb" in r]
    assert reserved and all(r > 0 for r in reserved)
    meta = json.loads((out / "adapter" / "riemann_tune.json").read_text())
    assert meta["quantized_on"] == "cuda" and meta["base_digest"]
