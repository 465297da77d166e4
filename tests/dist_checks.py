"""Small checks that need a real process group of 2 gloo processes, each writing what it saw as JSON.

    python -m tests.dist_checks CHECK --out DIR [--model DIR]

Started without RANK it spawns 2 copies of itself (a FileStore rendezvous, gloo on loopback), which join
through ``trainer.engine.init_distributed``, as workers do. CHECK is one of:
- ``agree``: every rank injects SARA and Mo-SARA into a model whose weights differ between ranks (as
  two GPUs' SVDs may); records the ranks and singular vectors each got, and what its own SVD says.
- ``timeout``: with ``--timeout-s`` as the collective timeout, rank 1 waits at a barrier that rank 0
  reaches only after ``--late-s``; records whether it failed and after how long.
- ``buckets``: builds a DeepSpeed ZeRO-2 engine on the tiny model and records its bucket sizes.
- ``vocab``: the vocabulary-sharded embedding, head and loss (trainer/model/vocab.py) against the same
  computations on the whole matrix, with a different number of tokens on each rank; records the
  largest differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2


def _different_per_rank(rank: int) -> nn.Module:
    """Two linear layers, the same on every rank but for rank 1's flatter spectrum (so its own SVD picks
    other ranks) and a rotated first layer (so its own singular vectors differ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 48))
    if rank == 1:
        with torch.no_grad():
            for layer in model:
                u, s, vh = torch.linalg.svd(layer.weight, full_matrices=False)
                layer.weight.copy_(u @ torch.diag(s.mean().expand_as(s)) @ vh)
            model[0].weight.copy_(torch.linalg.qr(torch.randn(40, 40))[0] @ model[0].weight)
    return model


def check_agree(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    from trainer.adapters import adapter_layers, inject_adapters, rank_map
    from trainer.adapters.sara import base_spectrum, svd_rank
    from trainer.config import AdapterConfig

    rule = AdapterConfig(method="sara").sara
    own = [svd_rank(base_spectrum(layer), rule) for layer in _different_per_rank(rank)]
    sara = _different_per_rank(rank)
    inject_adapters(sara, AdapterConfig(method="sara", target_modules=["0", "1"]))
    mosara = _different_per_rank(rank)
    inject_adapters(mosara, AdapterConfig(method="mosara", target_modules=["0", "1"]))
    vectors = {name: (layer.adapter.u, layer.adapter.v) for name, layer in adapter_layers(mosara)}
    return {
        "own_ranks": own,
        "sara_ranks": rank_map(sara),
        "mosara_ranks": rank_map(mosara),
        "mosara_u": {name: u.tolist() for name, (u, _) in vectors.items()},
        "mosara_v": {name: v.tolist() for name, (_, v) in vectors.items()},
    }


def check_timeout(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    if rank == 0:
        time.sleep(args.late_s)
    start = time.monotonic()
    try:
        dist.barrier()
        error = None
    except RuntimeError as e:  # gloo: "Timed out waiting ... for recv operation" or a closed peer
        error = str(e)[:300]
    return {"waited_s": time.monotonic() - start, "error": error}


def check_buckets(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    from trainer import config as config_lib
    from trainer.engine import build_engine
    from trainer.model import prepare_model
    from trainer.optim import build_optimizer, build_scheduler

    cfg = config_lib.validate(
        {
            "model": {"path": args.model},
            "distributed": {"zero_stage": 2, "num_workers": WORLD, "use_gpu": False},
            "train": {"micro_batch_size": 2},
            "data": {"train_path": "unused"},
            "output": {"dir": args.out},
        }
    )
    model = prepare_model(cfg, torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer, _ = build_optimizer(model, cfg.optim)
    engine = build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim, 1), cfg)
    zero = engine.optimizer
    return {
        "trainable": trainable,
        "reduce_bucket_size": int(zero.reduce_bucket_size),
        "allgather_bucket_size": int(zero.allgather_bucket_size),
    }


def check_vocab(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    import torch.nn.functional as F

    from trainer.data import IGNORE_INDEX
    from trainer.model.vocab import ShardedEmbedding, ShardedHead, VocabSplit, sharded_head_loss

    vocab, width = 14, 6
    split = VocabSplit.current()
    start, stop = split.rows(vocab)
    result: dict[str, Any] = {"rows": [start, stop]}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        weight = torch.randn(vocab, width, generator=torch.Generator().manual_seed(0)).to(dtype)
        gen = torch.Generator().manual_seed(10 + rank)
        tokens = 5 + 4 * rank  # ranks differ: the shorter one pads
        ids = torch.randint(0, vocab, (1, tokens), generator=gen)
        hidden = torch.randn(tokens, width, generator=gen).to(dtype)
        labels = torch.randint(0, vocab, (tokens,), generator=gen)
        labels[1] = IGNORE_INDEX
        embedding = ShardedEmbedding(weight[start:stop].clone(), vocab, split)
        result[f"{name}_embedding"] = (embedding(ids) - F.embedding(ids, weight)).abs().max().item()
        head = ShardedHead(weight[start:stop].clone(), vocab, split)
        with torch.no_grad():
            logits = head(hidden[None])
        result[f"{name}_logits"] = (logits[0] - F.linear(hidden, weight)).abs().max().item()
        h_ref = hidden.clone().requires_grad_(True)
        ref = F.cross_entropy(
            F.linear(h_ref, weight).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        ref.backward()
        assert h_ref.grad is not None
        for chunk in (0, 3):
            h = hidden.clone().requires_grad_(True)
            loss = sharded_head_loss(h, head, labels, chunk)
            loss.backward()
            assert h.grad is not None
            result[f"{name}_loss_rel_chunk{chunk}"] = abs(loss.item() - ref.item()) / abs(ref.item())
            scale = h_ref.grad.float().abs().max().item()
            result[f"{name}_grad_rel_chunk{chunk}"] = (
                h.grad.float() - h_ref.grad.float()
            ).abs().max().item() / scale
    return result


CHECKS = {"agree": check_agree, "timeout": check_timeout, "buckets": check_buckets, "vocab": check_vocab}


def spawn(args: argparse.Namespace) -> None:
    store = Path(args.out) / f".store-{uuid.uuid4().hex}"
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
        cmd = [sys.executable, "-m", "tests.dist_checks", *sys.argv[1:], "--store", str(store)]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"ranks exited with {codes}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--late-s", type=float, default=0.0)
    parser.add_argument("--store")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "RANK" not in os.environ:
        spawn(args)
        return
    from trainer.device import select_accelerator

    select_accelerator(False)
    from trainer.engine import init_distributed

    init_distributed(False, f"file://{args.store}", timeout_s=args.timeout_s)
    rank = dist.get_rank()
    result = CHECKS[args.check](args, rank)
    (Path(args.out) / f"{args.check}-rank{rank}.json").write_text(json.dumps(result))
    if args.check == "timeout":  # the peers are out of step: closing the group could wait on them
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
