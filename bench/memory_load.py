"""Per-rank peak memory of loading a 4-bit base and training on it: the streaming loader against
today's ``from_pretrained`` path, at 1, 2 and 4 workers under ZeRO-3 (and ZeRO-2 for reference).

    python -m bench.memory_load [--layers 16] [--hidden 1536] [--workers 1 2 4] [--steps 2]

A random-init Llama is saved once as a sharded bf16 safetensors checkpoint (bench/.cache/). Each variant
starts N worker processes (gloo over loopback, a file rendezvous); every worker samples its own
``RssAnon`` from /proc/self/status every 50 ms from a thread, which counts what the process allocated
and not the file-backed pages of the memory-mapped checkpoint (the kernel can drop those, and all
ranks share them). Reported: the baseline after start-up (torch, DeepSpeed imported, process group
up), the peak while loading (prepare_model + deepspeed.initialize) and over ``--steps`` steps, and the
peak minus the baseline (what the model, adapters and optimizer cost). The theoretical bar is the
issue's: the base's share of a rank's peak <= (4-bit base) / N + one decoder layer + 10%.
Today's path at 4 workers would hold four full copies: it is run at 1 and 2 only (``--old-workers``).

Also: one training step's peak memory at Llama-3's vocabulary (128,256) with the loss chunked and not
(``--vocab-seq``, tokens per sequence), on a 2-layer model of the same vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
GB = 1e9


class AnonSampler:
    """Peak RssAnon of this process per phase, sampled every 50 ms from a thread."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("/proc/self/status has no RssAnon line")

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.now()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
            time.sleep(0.05)

    def enter(self, phase: str) -> None:
        value = self.now()  # the last sample of the old phase and the first of the new
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), value)

    def stop(self) -> dict[str, int]:
        self.enter("end")
        self._stop.set()
        self._thread.join()
        return self.peaks


def build_checkpoint(layers: int, hidden: int, vocab: int) -> Path:
    """A random-init bf16 Llama saved as ~250 MB shards with an index (built once, then reused)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = CACHE / f"llama-{layers}x{hidden}-v{vocab}"
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model.to(torch.bfloat16)
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:6]}")
    model.save_pretrained(tmp, max_shard_size="250MB")
    tmp.rename(path)
    return path


def _config(args: argparse.Namespace, stage: int, world: int) -> Any:
    from trainer import config as config_lib

    return config_lib.validate(
        {
            "model": {
                "path": args.model,
                "quantization": "nf4",
                "gradient_checkpointing": bool(getattr(args, "checkpointing", False)),
            },
            "distributed": {"zero_stage": stage, "num_workers": world},
            "train": {
                "micro_batch_size": getattr(args, "micro_batch", 1),
                "grad_accum_steps": 1,
                "dtype": "bf16",
            },
            "data": {"train_path": "unused"},
            "output": {"dir": str(CACHE / "out")},
        }
    )


def worker(args: argparse.Namespace) -> None:
    """One rank of one variant: load, initialise, train ``--steps`` steps; write its peaks as JSON."""
    sampler = AnonSampler()
    from trainer.data.batches import StepBatch
    from trainer.engine import build_engine, init_distributed, layer_partitioner
    from trainer.loop import train_step
    from trainer.model import prepare_model, prepare_model_from_pretrained
    from trainer.optim import build_optimizer, build_scheduler

    init_distributed(False, f"file://{args.store}")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _config(args, args.stage, world)
    dist.barrier()
    sampler.enter("load")
    start = time.perf_counter()
    if args.loader == "pretrained":
        model = prepare_model_from_pretrained(cfg, torch.device("cpu"))
    else:
        model = prepare_model(cfg, torch.device("cpu"), layer_partitioner(cfg, world))
    optimizer, _ = build_optimizer(model, cfg.optim)
    engine = build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim, 10), cfg)
    load_s = time.perf_counter() - start
    dist.barrier()
    sampler.enter("steps")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        ids = torch.randint(3, vocab, (cfg.train.micro_batch_size, args.length), generator=gen)
        batch = StepBatch(micro_batches=[{"input_ids": ids, "labels": ids}],
                          global_loss_tokens=world * ids.shape[0] * (args.length - 1),
                          global_tokens=world * ids.numel(),
                          epoch=0)  # fmt: skip
        train_step(engine, batch, world)
    dist.barrier()
    peaks = sampler.stop()
    record = {"rank": rank, "load_s": load_s, **{f"peak_{k}": v for k, v in peaks.items()}}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record))


def run_variant(
    args: argparse.Namespace, loader: str, stage: int, world: int, malloc_mmap_threshold: int | None = None
) -> list[dict[str, Any]]:
    """``malloc_mmap_threshold``: glibc's MALLOC_MMAP_THRESHOLD_ for the workers (fixed: every block of
    that size or more is mmapped and returned to the OS when freed; by default glibc raises the
    threshold as large blocks are freed and then keeps freed layer-sized blocks in its heap, which
    RssAnon counts as if they were live)."""
    out = CACHE / f"run-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True)
    store = out / "store"
    threads = str(max(1, (os.cpu_count() or 1) // world))
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": threads}  # fmt: skip
        if malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
        cmd = [sys.executable, "-m", "bench.memory_load", "--worker", "--model", args.model,
               "--out", str(out), "--store", str(store), "--loader", loader, "--stage", str(stage),
               "--steps", str(args.steps), "--length", str(args.length),
               "--micro-batch", str(getattr(args, "micro_batch", 1)),
               *(["--checkpointing"] if getattr(args, "checkpointing", False) else [])]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    errors = [p.communicate()[1] for p in procs]
    codes = [p.returncode for p in procs]
    if any(codes):
        raise SystemExit(
            f"{loader} ZeRO-{stage} x{world}: ranks exited {codes}\n{errors[0].decode()[-3000:]}"
        )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def base_bytes(model_path: str) -> tuple[int, int]:
    """(the whole 4-bit base, its largest decoder layer) in bytes, as a rank would hold them whole:
    packed NF4 weights + absmax + double-quant constants, bf16 embeddings, head and norms."""
    from trainer.model import prepare_model

    cfg = _config(argparse.Namespace(model=model_path), 2, 1)
    sizes: dict[str, int] = {}

    def size(module: torch.nn.Module) -> int:
        total = 0
        for p in module.parameters():
            if p.requires_grad:
                continue
            total += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if state is not None:
                total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                             if isinstance(t, torch.Tensor))  # fmt: skip
        return total

    model = prepare_model(cfg, torch.device("cpu"))
    from trainer.model.stream import units

    for name, unit in units(model):
        sizes[name] = size(unit)
    layers = [v for k, v in sizes.items() if ".layers." in f".{k}"]
    del model
    return sum(sizes.values()), max(layers)


def loss_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak RssAnon of one forward+backward of the loss at the Llama-3 vocabulary, chunked and not."""
    rows = []
    for chunk in (0, 1024, 256):
        cmd = [sys.executable, "-m", "bench.memory_load", "--loss-worker", "--length", str(args.vocab_seq),
               "--chunk", str(chunk)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def loss_worker(args: argparse.Namespace) -> None:
    """One step of a 2-layer, 256-wide bf16 model with a 128,256-token vocabulary (frozen base + LoRA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.loss import loss_sum

    sampler = AnonSampler()
    config = LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model.to(torch.bfloat16).requires_grad_(False)
    model.model.layers[-1].mlp.down_proj.weight.requires_grad_(True)
    ids = torch.randint(3, 128256, (1, args.length), generator=torch.Generator().manual_seed(0))
    before = AnonSampler.now()  # the model exists: what follows is the step's own memory
    sampler.enter("step")
    loss = loss_sum(model, {"input_ids": ids}, ids, args.chunk)
    loss.backward()
    peaks = sampler.stop()
    print(json.dumps({"chunk tokens": args.chunk, "tokens": args.length, "vocab": 128256,
                      "before step GB": before / GB, "step peak GB": peaks["step"] / GB,
                      "step above before GB": (peaks["step"] - before) / GB,
                      "loss": loss.item()}))  # fmt: skip


def _row(loader: str, stage: int, world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    peak = [max(r["peak_load"], r["peak_steps"]) for r in ranks]
    return {
        "loader": loader, "zero": stage, "workers": world,
        "baseline GB (rank 0)": ranks[0]["peak_start"] / GB,
        "load peak GB per rank": [round(r["peak_load"] / GB, 3) for r in ranks],
        "steps peak GB per rank": [round(r["peak_steps"] / GB, 3) for r in ranks],
        "max peak GB": max(peak) / GB,
        "max model share GB": max(p - r["peak_start"] for p, r in zip(peak, ranks, strict=True)) / GB,
        "all ranks GB": sum(peak) / GB,
        "load s": max(r["load_s"] for r in ranks),
    }  # fmt: skip


def plot(rows: list[dict[str, Any]], bar: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for loader, style in (("stream", "o-"), ("pretrained", "s--")):
        points = sorted(
            (r["workers"], r["max model share GB"]) for r in rows if r["loader"] == loader and r["zero"] == 3
        )
        if points:
            ax.plot(*zip(*points, strict=True), style, label=f"{loader} (ZeRO-3)")
    ns = sorted(bar)
    ax.plot(ns, [bar[n] for n in ns], ":", color="grey", label="base / N + layer + 10%")
    ax.set_xlabel("workers N")
    ax.set_ylabel("per-rank peak RssAnon above start-up (GB)")
    ax.set_xticks(ns)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--old-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--vocab-seq", type=int, default=2048)
    parser.add_argument("--name", default="memory_load")
    parser.add_argument("--part", choices=["load", "loss", "all"], default="all")
    parser.add_argument("--zero2", action="store_true", help="also both loaders at ZeRO-2 x 2")
    # worker modes
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--loader", default="stream", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.loss_worker:
        return loss_worker(args)
    if min(args.workers + args.old_workers) < 1 or args.steps < 1 or args.layers < 1:
        parser.error("--workers, --old-workers, --steps and --layers must be at least 1")
    if args.part in ("load", "all"):
        load_part(args)
    if args.part in ("loss", "all"):
        losses = loss_memory(args)
        print_table(losses, list(losses[0]))
        path = write_results(f"{args.name}_loss", {"rows": losses})
        print(f"\nwrote {path}")


def load_part(args: argparse.Namespace) -> None:
    args.model = str(build_checkpoint(args.layers, args.hidden, args.vocab))
    base, layer = base_bytes(args.model)
    print(f"4-bit base {base / GB:.3f} GB, largest decoder layer {layer / GB:.3f} GB", flush=True)
    variants = [("stream", 3, n) for n in args.workers] + [("pretrained", 3, n) for n in args.old_workers]
    if args.zero2:
        variants += [("stream", 2, 2), ("pretrained", 2, 2)]
    bar = {n: (base / n + layer) * 1.1 / GB for n in sorted(set(args.workers))}
    rows: list[dict[str, Any]] = []
    for loader, stage, world in variants:
        row = _row(loader, stage, world, run_variant(args, loader, stage, world))
        row["bar GB"] = bar.get(world, float("nan")) if stage == 3 else float("nan")
        rows.append(row)
        print(f"{loader} ZeRO-{stage} x{world}: max peak {row['max peak GB']:.2f} GB", flush=True)
        _write(args, base, layer, rows, bar)  # after each variant: a cut-short run keeps what it measured
    print_table(rows, list(rows[0]))
    print(f"\nwrote {RESULTS / args.name}.json and .png")


def _write(
    args: argparse.Namespace, base: int, layer: int, rows: list[dict[str, Any]], bar: dict[int, float]
) -> None:
    payload = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "steps": args.steps,
               "length": args.length, "base_bytes": base, "largest_layer_bytes": layer,
               "rows": rows}  # fmt: skip
    write_results(args.name, payload)
    plot(rows, bar, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
