"""Train many configurations in one launch and record adapter weights and collective bytes per step.

    python -m tests.zero_harness --model DIR --out DIR --world 2 --accum 2 --configs JSON

Started without RANK it spawns ``--world`` copies of itself (a FileStore rendezvous, gloo on loopback).
Every process then runs each configuration in turn: a fresh adapted model, optimizer and DeepSpeed engine,
``--steps`` optimizer steps on deterministic token batches cut exactly like trainer.data cuts a global
batch (rank r takes micro-batch j * world + r), so any (world, accum) with the same product sees the
same global batches. Rank 0 writes ``<name>.safetensors`` (the gathered adapter) and ``<name>.json``
(bytes sent per collective kind and step, counted by wrapping torch.distributed before DeepSpeed runs).
Starting the stack once for many configurations keeps the ZeRO 0-3 matrix affordable on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single", "all_to_all_single",
    "_all_gather_base", "_reduce_scatter_base",
)  # fmt: skip
SENT: dict[str, int] = defaultdict(int)
LOOP_FILE = str(Path("trainer") / "loop.py")


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # The first argument is what the op moves (the output buffer of all_gather_into_tensor; its
        # input is a 1/world slice of it, the same for every configuration compared).
        SENT[name] += _nbytes(args[0] if args else next(iter(kwargs.values()), None))
        return fn(*args, **kwargs)

    return wrapper


def count_collectives() -> None:
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _counting(name, getattr(dist, name)))


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[int]]:
    """Count the values trainer/loop.py reads back to the host (``item``, ``tolist``, ``float``, ``bool``)
    inside the block: on CUDA each is a wait for the device."""
    count, names = [0], ("item", "tolist", "__float__", "__bool__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any) -> Any:
            if sys._getframe(1).f_code.co_filename.endswith(LOOP_FILE):
                count[0] += 1
            return fn(self, *args)

        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield count
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def token_batches(step: int, n_micro: int, micro: int, length: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (n_micro * micro, length), generator=gen)
    return list(ids.split(micro))


def adapter_state(model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every adapter tensor, gathered whole (ZeRO-3), in float32."""
    from trainer.adapters import adapter_layers
    from trainer.engine import gathered

    params = [p for _, layer in adapter_layers(model) for p in layer.adapter.parameters()]
    with gathered(params, zero_stage):
        return {
            f"{name}.{key}": t.detach().float().clone()
            for name, layer in adapter_layers(model)
            for key, t in layer.adapter.peft_state_dict().items()
        }


def run_config(spec: dict[str, Any], args: argparse.Namespace) -> None:
    """One configuration; spec keys: name, stage, and optionally quant, checkpointing, precond, optim,
    offload, dtype, clip (optim.grad_clip; default none), steps, save_init (also write the adapter before
    training, ``<name>.init.safetensors``), loader ("stream", the default, or "pretrained": the
    from_pretrained baseline), logits (save the logits before any step), chunk (loss chunk tokens)."""
    from safetensors.torch import save_file

    from trainer import config as config_lib
    from trainer.data.batches import StepBatch
    from trainer.engine import build_engine, global_grad_norm, layer_partitioner
    from trainer.loop import train_step
    from trainer.model import count_parameters, prepare_model, prepare_model_from_pretrained
    from trainer.model.vocab import ShardedEmbedding, ShardedHead
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.optim.riemannian import _partitioned

    rank, world = dist.get_rank(), dist.get_world_size()
    steps = spec.get("steps", args.steps)
    cfg = config_lib.validate(
        {
            "model": {"path": args.model, "quantization": spec.get("quant", "none"),
                      "gradient_checkpointing": spec.get("checkpointing", False)},
            "optim": {"lr": 1e-2, "preconditioner": spec.get("precond", "riemannian"),
                      "grad_clip": spec.get("clip"), "name": spec.get("optim", "adamw")},
            "distributed": {"zero_stage": spec["stage"], "num_workers": world,
                            "offload_optimizer": spec.get("offload", False)},
            "train": {"micro_batch_size": args.micro, "grad_accum_steps": args.accum,
                      "dtype": spec.get("dtype", "fp32")},
            "data": {"train_path": "unused"},
            "output": {"dir": args.out},
        }
    )  # fmt: skip
    stage, out = cfg.distributed.zero_stage, Path(args.out)
    SENT.clear()
    if spec.get("loader", "stream") == "pretrained":  # the from_pretrained baseline
        model = prepare_model_from_pretrained(cfg, torch.device("cpu"))
    else:
        model = prepare_model(cfg, torch.device("cpu"), layer_partitioner(cfg, world))
    load_bytes = dict(SENT)
    # base parameters a rank holds whole once loading is done (ZeRO-3 streaming: none)
    whole = sum(1 for p in model.parameters() if not p.requires_grad and p.data.numel() > 0)
    split = [n for n, m in model.named_modules() if isinstance(m, (ShardedEmbedding, ShardedHead))]
    optimizer, preconditioner = build_optimizer(model, cfg.optim)
    SENT.clear()
    engine = build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim, steps), cfg)
    init_bytes = dict(SENT)
    if spec.get("save_init"):
        init = adapter_state(model, stage)
        if rank == 0:
            save_file(init, str(out / f"{spec['name']}.init.safetensors"))
    vocab = model.config.vocab_size
    if spec.get("logits"):  # before any step, every rank forwards (ZeRO-3 gathers as it goes)
        with torch.no_grad():
            ids = torch.randint(3, vocab, (2, args.length), generator=torch.Generator().manual_seed(7))
            logits = engine(input_ids=ids, use_cache=False).logits.float()
    bytes_per_step, grad_norms, lrs, host_reads = [], [], [], []
    for step in range(steps):
        SENT.clear()
        micro_batches = token_batches(step, world * args.accum, args.micro, args.length, vocab)
        mine = [micro_batches[j * world + rank] for j in range(args.accum)]
        batch = StepBatch(
            micro_batches=[{"input_ids": m, "labels": m} for m in mine],
            global_loss_tokens=sum(m[:, 1:].numel() for m in micro_batches),
            global_tokens=sum(m.numel() for m in micro_batches),
            epoch=0,
        )
        lrs.append(engine.get_lr()[0])
        with counting_host_reads() as reads:
            train_step(engine, batch, world, chunk=spec.get("chunk", 0))
        host_reads.append(reads[0])
        bytes_per_step.append(dict(SENT))
        grad_norms.append(global_grad_norm(engine))  # what the loop logs as grad_norm
    state = adapter_state(model, stage)
    trainable, total = count_parameters(model)  # after ZeRO-3 has partitioned the parameters
    if rank == 0:
        save_file(state, str(out / f"{spec['name']}.safetensors"))
        if spec.get("logits"):
            save_file({"logits": logits.contiguous()}, str(out / f"{spec['name']}.logits.safetensors"))
        # pairs whose systems are formed one at a time, while their module is gathered (ZeRO-3)
        partitioned = sum(_partitioned(s.a) for s in preconditioner.slots) if preconditioner else 0
        factorisations = preconditioner.factorisations if preconditioner else 0
        record = {"bytes_per_step": bytes_per_step, "partitioned_pairs": partitioned,
                  "load_bytes": load_bytes, "init_bytes": init_bytes, "whole_after_load": whole,
                  "vocab_sharded": split,
                  "factorisations": factorisations, "steps": steps, "grad_norm": grad_norms, "lr": lrs,
                  "trainable_params": trainable, "total_params": total,
                  "loop_host_reads": host_reads}  # fmt: skip
        (out / f"{spec['name']}.json").write_text(json.dumps(record))
    dist.barrier()


def spawn(args: argparse.Namespace) -> None:
    store = Path(args.out) / f".store-{uuid.uuid4().hex}"
    procs = []
    for rank in range(args.world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.world),
               "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.zero_harness", *sys.argv[1:],
                                       "--store", str(store)], env=env))  # fmt: skip
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"harness ranks exited with {codes}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--configs", required=True, help="JSON list of {name, stage, quant, dtype, precond, ...}"
    )
    parser.add_argument("--store")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "RANK" not in os.environ:
        spawn(args)
        return
    count_collectives()
    from trainer.engine import init_distributed

    init_distributed(False, f"file://{args.store}")
    for spec in json.loads(args.configs):
        run_config(spec, args)


if __name__ == "__main__":
    main()
