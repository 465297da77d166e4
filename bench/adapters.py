"""Every adapter method on the tiny demo model, side by side: trainable parameters, step time and training
memory relative to LoRA at the same rank, and eval loss after a fixed number of steps.

    python -m bench.adapters [--steps 30] [--rounds 2] [--methods lora,dora,...]

Each method runs in its own process through the real stack: its configs/tiny-cpu-<method>.yaml (4-bit
bf16 base, the method's learning rate and preconditioner: riemannian for lora/dora/sara, none for the
others), rank 8, one DeepSpeed ZeRO-2 worker, no tracking, one torch thread. It trains ``--steps`` steps
on the data (eval loss before and after), then times 10 more steps on one fixed batch after 2 warm-up
steps: bf16 CPU kernels keep state per input shape (the resident set grows with every new sequence
length, adapters or not), so fixed shapes measure the method, not the data. Step time: the median of
those 10, in the best of ``--rounds`` interleaved runs. Memory: on CPU the peak resident set sampled
during those steps minus the resident set just before them (activations, gradients, optimizer state,
the method's temporaries); on a GPU, torch's peak allocation. Writes bench/results/adapters.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["lora", "dora", "sara", "bone", "bat", "flora", "mosara"]


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """The largest resident set seen while running (sampled every 2 ms on a thread)."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _engine(method: str, steps: int, rank: int) -> tuple[Any, Any, Any, Any, Any]:
    """(run config, engine, model, training plan, eval batches) for ``method`` through the real stack."""
    import torch

    from launch.env import apply_defaults, resolve_paths
    from trainer import config as config_lib
    from trainer.data import build_data
    from trainer.engine import build_engine, init_distributed
    from trainer.model import ensure_tiny_model, load_tokenizer, prepare_model
    from trainer.optim import build_optimizer, build_scheduler

    apply_defaults()
    overrides = [
        *(f"adapter.rank={rank}", "distributed.backend=local", "distributed.num_workers=1"),
        *(f"train.max_steps={steps}", "tracking.enabled=false", "output.dir=runs/bench-adapters"),
    ]
    cfg = resolve_paths(config_lib.load(ROOT / "configs" / f"tiny-cpu-{method}.yaml", overrides))
    assert cfg.model.build is not None
    ensure_tiny_model(cfg.model.path, cfg.model.build)
    gpu = torch.cuda.is_available()
    init_distributed(gpu)
    model = prepare_model(cfg, torch.device("cuda" if gpu else "cpu"))
    optimizer, _ = build_optimizer(model, cfg.optim)
    engine = build_engine(model, optimizer, build_scheduler(optimizer, cfg.optim, steps), cfg)
    plan, evals = build_data(cfg, load_tokenizer(cfg.model.path), rank=0, world_size=1)
    return cfg, engine, model, plan, evals


def _time_and_memory(engine: Any, batch: Any, repeats: int) -> tuple[list[float], float]:
    """Step times on one batch repeated, and the training memory of a step (see the module docstring)."""
    import torch

    from trainer.loop import train_step

    gpu = torch.cuda.is_available()
    for _ in range(2):  # warm the per-shape kernel caches (bf16 CPU kernels grow RSS for each new shape)
        train_step(engine, batch, world_size=1)
    before, times = _rss_mb(), []
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakSampler() as sampler:
        for _ in range(repeats):
            start = time.perf_counter()
            train_step(engine, batch, world_size=1)
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated() / 2**20 if gpu else sampler.peak - before


def measure(method: str, steps: int, rank: int, repeats: int = 10) -> dict[str, Any]:
    """Train ``method`` for ``steps`` steps, evaluating before and after; then time ``repeats`` more steps
    on one fixed batch. What the table reports for it."""
    import torch

    from trainer.adapters import rank_map
    from trainer.loop import evaluate, train_step
    from trainer.model import count_parameters

    # One thread: on a small shared machine, thread contention is the largest source of noise, and the
    # ratios between methods are what this measures.
    torch.set_num_threads(1)
    cfg, engine, model, plan, evals = _engine(method, steps, rank)
    eval_start = evaluate(engine, evals)
    for step in range(steps):
        train_step(engine, plan.for_step(step), world_size=1)
    eval_end = evaluate(engine, evals)
    times, memory = _time_and_memory(engine, plan.for_step(0), repeats)
    ranks = list(rank_map(model).values())
    return {
        "method": method,
        "mean_rank": sum(ranks) / len(ranks),
        "trainable_params": count_parameters(model)[0],
        "step_ms": 1000 * statistics.median(times),
        "train_memory_mb": memory,
        "eval_loss_start": eval_start,
        "eval_loss_end": eval_end,
        "preconditioner": cfg.optim.preconditioner,
        "lr": cfg.optim.lr,
    }


def _run_child(method: str, steps: int, rank: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.adapters",
        "--child",
        method,
        "--steps",
        str(steps),
        "--rank",
        str(rank),
    ]
    # A fixed mmap threshold turns off glibc's dynamic one, which a large free (SARA's SVD at injection)
    # raises, moving later activations onto a heap that never shrinks: RSS would then measure the
    # allocator's history rather than the method's memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(min(runs, key=lambda r: r["step_ms"]))
    best["step_ms_rounds"] = [r["step_ms"] for r in runs]
    best["train_memory_mb_rounds"] = [r["train_memory_mb"] for r in runs]
    return best


def _relative(rows: list[dict[str, Any]]) -> None:
    lora = next(r for r in rows if r["method"] == "lora")
    for row in rows:
        row["params_vs_lora"] = row["trainable_params"] / lora["trainable_params"]
        row["step_vs_lora"] = row["step_ms"] / lora["step_ms"]
        row["memory_vs_lora"] = row["train_memory_mb"] / max(lora["train_memory_mb"], 1e-9)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("params_vs_lora", "trainable params / LoRA"),
        ("step_vs_lora", "step time / LoRA"),
        ("memory_vs_lora", "training memory / LoRA"),
        ("eval_loss_end", "eval loss after training"),
    ]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.bar(names, [r[key] for r in rows], color=["#444" if n == "lora" else "#4a7ab8" for n in names])
        if key.endswith("vs_lora"):
            ax.axhline(1.0, color="#999", linewidth=0.8)
        else:
            start = rows[0]["eval_loss_start"]
            ax.axhline(start, color="#c44", linewidth=0.8, label="before training")
            ax.set_ylim(min(r[key] for r in rows) * 0.98, start * 1.01)
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle("Adapter methods on the tiny 4-bit Llama (rank 8, same data and steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=2, help="runs of every method, interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.rank)))
        return
    methods = args.methods.split(",")
    if "lora" not in methods:
        methods.insert(0, "lora")  # every ratio is relative to LoRA
    # Rounds interleave the methods so a burst of load on the shared machine hits one run of each, not
    # every run of one; each method keeps its least disturbed round (the smallest median step time).
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method in methods:
            runs[method].append(_run_child(method, args.steps, args.rank))
    rows = [_best(method_runs) for method_runs in runs.values()]
    _relative(rows)
    columns = [
        "method",
        "mean_rank",
        "trainable_params",
        "params_vs_lora",
        "step_ms",
        "step_vs_lora",
        "train_memory_mb",
        "memory_vs_lora",
        "eval_loss_start",
        "eval_loss_end",
    ]
    print_table(rows, columns)
    path = write_results(
        "adapters", {"steps": args.steps, "rank": args.rank, "rounds": args.rounds, "rows": rows}
    )
    plot(rows, RESULTS / "adapters.png")
    print(f"\nwrote {path} and {RESULTS / 'adapters.png'}")


if __name__ == "__main__":
    main()
