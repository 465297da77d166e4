"""The memory planner against measurement: predicted and measured peak anonymous memory, per rank.

    python -m bench.planner_accuracy [--sizes S M L] [--only-predict] [--points N]

Each grid point is a real training run (``--steps`` steps, NF4 base, LoRA r8 all-linear, bf16, CPU,
gloo) started by bench.memory_load's own variant runner: N worker processes, each sampling its own
``RssAnon`` every 50 ms (file-backed pages of the memory-mapped checkpoint are not counted), glibc's
mmap threshold fixed at 64 KiB so freed tensors leave the process (as tests/test_memory_load.py runs).
The prediction for the same point is ``trainer.plan``'s per-rank peak for the CPU (``device=cpu``:
the host is the device, and the process start-up constant stands where a GPU's CUDA/NCCL context
would), computed from the model's config.json alone.

The grid: 3 model sizes x ZeRO 2 and 3 x 1 and 2 workers x micro-batch 1 and 4 x gradient
checkpointing on and off = 48 points (``--sizes`` picks the sizes); ``--half`` measures its 24-point
half fraction (8 points a size, every factor and pair of factors balanced), what fits in a session on
a shared 2-core machine. Measurements are kept in
bench/results/planner_accuracy_measured.json as they finish, so a cut-short run keeps what it measured
and ``--only-predict`` recomputes the predictions without re-running anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, print_table, write_results
from bench.memory_load import build_checkpoint, run_variant

GB = 1e9
MALLOC_THRESHOLD = 1 << 16
# (layers, hidden) of the random-init Llamas measured (vocabulary 32,000): ~43M, ~196M, ~0.32B parameters
SIZES = {"S": (4, 512), "M": (8, 1024), "L": (12, 1280)}
MEASURED = RESULTS / "planner_accuracy_measured.json"


def grid(sizes: list[str], half: bool = False) -> list[dict[str, Any]]:
    """Every grid point as a dict: size, zero, workers, micro_batch, checkpointing. ``half``: the
    half fraction of the four two-level factors whose number of "high" levels (ZeRO-3, 2 workers,
    micro-batch 4, checkpointing on) is odd, 8 points a size in which every factor, and every pair of
    factors, appears at each level equally often (a resolution-IV design)."""
    points = []
    for size, zero, workers, mb, ckpt in itertools.product(sizes, (2, 3), (1, 2), (1, 4), (False, True)):
        if half and ((zero == 3) + (workers == 2) + (mb == 4) + ckpt) % 2 == 0:
            continue
        points.append(
            {"size": size, "zero": zero, "workers": workers, "micro_batch": mb, "checkpointing": ckpt}
        )
    return points


def key(point: dict[str, Any]) -> str:
    return "{size}-z{zero}-n{workers}-mb{micro_batch}-ck{checkpointing:d}".format(**point)


def measure(point: dict[str, Any], length: int, steps: int) -> dict[str, Any]:
    """One real run of ``point``: per-rank peak RssAnon (over load and steps) and start-up."""
    layers, hidden = SIZES[point["size"]]
    model = build_checkpoint(layers, hidden, 32000)
    args = argparse.Namespace(
        model=str(model), steps=steps, length=length, micro_batch=point["micro_batch"],
        checkpointing=point["checkpointing"],
    )  # fmt: skip
    start = time.perf_counter()
    ranks = run_variant(
        args, "stream", point["zero"], point["workers"], malloc_mmap_threshold=MALLOC_THRESHOLD
    )
    return {
        **point, "length": length, "steps": steps, "model": str(model), "wall_s": time.perf_counter() - start,
        "start_bytes": [r["peak_start"] for r in ranks],
        "load_bytes": [r["peak_load"] for r in ranks],
        "steps_bytes": [r["peak_steps"] for r in ranks],
        "peak_bytes": [max(r["peak_load"], r["peak_steps"]) for r in ranks],
    }  # fmt: skip


def predict(record: dict[str, Any]) -> list[int]:
    """The planner's per-rank peak for the measured point (the same config the worker ran)."""
    from bench.memory_load import _config
    from trainer.plan import plan_config

    args = argparse.Namespace(model=record["model"], micro_batch=record["micro_batch"],
                              checkpointing=record["checkpointing"])  # fmt: skip
    cfg = _config(args, record["zero"], record["workers"])
    plan = plan_config(cfg, device="cpu", seq_len=record["length"])
    return [plan.rank_peak_bytes(rank) for rank in range(record["workers"])]


def load_measured(*paths: Path) -> dict[str, Any]:
    """Every point measured so far, from the main store and any side stores (parallel runs)."""
    points: dict[str, Any] = {}
    for path in (MEASURED, *paths):
        if path.is_file():
            points.update(json.loads(path.read_text())["points"])
    return points


def save_measured(points: dict[str, Any], path: Path = MEASURED) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "points": points}, indent=1) + "\n")


def compare(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rank of each point: predicted, measured, relative error."""
    rows = []
    for record in records:
        for rank, (pred, meas) in enumerate(zip(predict(record), record["peak_bytes"], strict=True)):
            rows.append({
                "point": key(record), "rank": rank, "predicted GB": pred / GB, "measured GB": meas / GB,
                "error %": 100 * (pred - meas) / meas,
            })  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for size, marker in zip(SIZES, "os^", strict=True):
        sel = [r for r in rows if r["point"].startswith(size + "-")]
        if sel:
            ax.scatter([r["measured GB"] for r in sel], [r["predicted GB"] for r in sel], marker=marker,
                       label=f"{size}: {SIZES[size][0]} x {SIZES[size][1]}")  # fmt: skip
    low = min(min(r["measured GB"], r["predicted GB"]) for r in rows) * 0.9
    high = max(max(r["measured GB"], r["predicted GB"]) for r in rows) * 1.1
    ax.plot([low, high], [low, high], "k-", lw=0.8, label="exact")
    for f in (0.9, 1.1):
        ax.plot([low, high], [low * f, high * f], "k:", lw=0.6)
    ax.set_xlabel("measured peak RssAnon per rank (GB)")
    ax.set_ylabel("planned peak per rank (GB)")
    ax.set_title("trainer.plan vs measurement (dotted: +-10%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [abs(r["error %"]) for r in rows]
    return {
        "rank rows": len(rows), "points": len({r["point"] for r in rows}),
        "max abs error %": max(errors), "median abs error %": statistics.median(errors),
        "within 10 %": sum(e <= 10 for e in errors),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only-predict", action="store_true", help="use the stored measurements only")
    parser.add_argument("--points", type=int, default=0, help="measure at most this many new points")
    parser.add_argument("--half", action="store_true", help="the 24-point half fraction (see grid)")
    parser.add_argument(
        "--store",
        type=Path,
        default=MEASURED,
        help="where this run keeps its measurements (a second run in parallel: its own file)",
    )
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="other stores to read")
    parser.add_argument("--reverse", action="store_true", help="measure the grid from its end")
    args = parser.parse_args()
    measured = load_measured(args.store, *args.also)
    if not args.only_predict:
        # round-robin over the sizes, so that a run cut short has measured every size
        per_size = [[p for p in grid([size], args.half) if key(p) not in measured] for size in args.sizes]
        todo = [p for group in itertools.zip_longest(*per_size) for p in group if p is not None]
        todo = todo[::-1] if args.reverse else todo
        for point in todo[: args.points or None]:
            record = measure(point, args.length, args.steps)
            measured[key(point)] = record
            save_measured(measured, args.store)
            print(f"{key(point)}: {[round(b / GB, 3) for b in record['peak_bytes']]} GB "
                  f"({record['wall_s']:.0f} s)", flush=True)  # fmt: skip
    records = [measured[key(p)] for p in grid(args.sizes) if key(p) in measured]  # all measured, half or not
    rows = compare(records)
    print_table(rows, list(rows[0]))
    stats = summary(rows)
    print("\n" + json.dumps(stats))
    write_results("planner_accuracy", {"summary": stats, "rows": rows, "records": records})
    plot(rows, RESULTS / "planner_accuracy.png")
    print(f"wrote {RESULTS / 'planner_accuracy'}.json and .png")


if __name__ == "__main__":
    main()
