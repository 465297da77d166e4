"""What sharing the cores between local workers buys.

    python -m bench.local_threads [--steps N] [--rounds R]

The demo config on the local backend's 2 worker processes, twice per round in alternating order: with
the launcher's default (OMP_NUM_THREADS = cores / workers) and with a thread per core in every worker
(what each worker did before the launcher set it, and what torch does unless told). Reports the wall
time of the whole run and the training throughput (summary.json's tokens_per_s), medians over rounds,
and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
CORES = len(os.sched_getaffinity(0))
VARIANTS = {"shared (cores / workers)": None, "a thread per core each": str(CORES)}


def run(threads: str | None, steps: int, out: Path) -> tuple[float, float]:
    """(wall seconds, training tokens/s) of one run of the demo on 2 local workers."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    cmd = [sys.executable, "-m", "launch", "train", "configs/tiny-cpu.yaml", "distributed.backend=local",
           f"train.max_steps={steps}", "checkpoint.every_n_steps=1000", "tracking.system_metrics=false",
           f"output.dir={out}"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    return wall, float(json.loads((out / "summary.json").read_text())["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="local-threads-") as tmp:
        for i in range(args.rounds):
            order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                out = Path(tmp) / f"{i}-{len(results[name])}-{name.split()[0]}"
                results[name].append(run(VARIANTS[name], args.steps, out))
                print(
                    f"round {i + 1}: {name}: {results[name][-1][0]:.1f} s, {results[name][-1][1]:.0f} tok/s"
                )
    rows: list[dict[str, Any]] = []
    for name, runs in results.items():
        rows.append({
            "worker threads": name, "OMP_NUM_THREADS": VARIANTS[name] or str(max(1, CORES // 2)),
            "wall s": statistics.median(w for w, _ in runs),
            "train tokens/s": statistics.median(t for _, t in runs),
        })  # fmt: skip
    base = rows[0]
    for row in rows:
        row["wall vs shared"] = row["wall s"] / base["wall s"]
        row["tokens/s vs shared"] = row["train tokens/s"] / base["train tokens/s"]
    print()
    print_table(rows, list(rows[0]))
    path = write_results("local_threads", {"steps": args.steps, "rounds": args.rounds, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
