"""A long run: does a worker's memory stay flat after warm-up, and does the disk stay bounded?

    python -m bench.soak [--steps 20000] [--warmup 1000] [--backends ray,local] [--sample-s 2]

The demo config (configs/tiny-cpu.yaml) for --steps steps, with a checkpoint every 500 steps (keeping
the last 2), an eval every 1000 (--checkpoint-every, --eval-every) and MLflow on a sqlite store, once
per backend: Ray with 2 workers, and the local backend with 1 worker (the CLI process itself). Every
--sample-s seconds it records the step reached (the last row of metrics.jsonl), every worker's RssAnon
(/proc/<pid>/status; the workers are found among the CLI's descendants) and the size of the output
directory, the MLflow store and Ray's session directory (RAY_TMPDIR, one per run).

Per worker it reports the least-squares slope of RssAnon against step after --warmup steps, in MB per
10,000 steps, over the whole post-warm-up range and over its second half alone (a plateau shows as a
second-half slope near zero). Writes bench/results/soak.json and soak.png (memory and disk vs step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {"ray": ["distributed.backend=ray", "distributed.num_workers=2"],
            "local": ["distributed.backend=local", "distributed.num_workers=1"]}  # fmt: skip


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat (the parent is the field after the name)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(root: int, backend: str) -> list[int]:
    """The training processes under ``root`` (the CLI): Ray Train's worker actors, or the local
    backend's workers (the CLI itself when it trains in-process)."""
    procs = _descendants(root)
    if backend == "ray":
        return sorted(p for p in procs if "RayTrainWorker" in _cmdline(p))
    spawned = [p for p in procs if p != root and "launch train" in _cmdline(p)]
    return sorted(spawned) or [root]


def rss_anon_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def dir_mb(path: Path) -> float:
    """Apparent size of the file ``path``, or of every file under it (0 if absent; files vanishing
    meanwhile are skipped)."""
    if path.is_file():
        return path.stat().st_size / 2**20
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue
    return total / 2**20


def last_step(metrics: Path) -> int:
    """The step of metrics.jsonl's last whole row (0 before the first)."""
    try:
        with metrics.open("rb") as f:
            f.seek(max(0, metrics.stat().st_size - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def sample(out: Path, backend: str, start: float, sizes: dict[str, Path], pid: int) -> dict[str, Any]:
    """One sample of a run: time, step reached, each worker's RssAnon and the size of ``sizes``' paths."""
    rss = {str(p): mb for p in worker_pids(pid, backend) if (mb := rss_anon_mb(p)) is not None}
    return {"t_s": time.monotonic() - start, "step": last_step(out / "metrics.jsonl"), "rss_anon_mb": rss,
            **{f"{name}_mb": dir_mb(path) for name, path in sizes.items()}}  # fmt: skip


def watch(proc: subprocess.Popen[bytes], out: Path, backend: str, sample_s: float,
          sizes: dict[str, Path]) -> list[dict[str, Any]]:  # fmt: skip
    """Samples of the run of ``proc`` (a ``python -m launch train``, output dir ``out``) until it ends."""
    samples, start = [], time.monotonic()
    while proc.poll() is None:
        samples.append(sample(out, backend, start, sizes, proc.pid))
        time.sleep(sample_s)
    return samples


def soak(backend: str, args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """One run of the demo on ``backend``, sampled until it ends; the samples and the log's size."""
    out, ray_tmp, store = tmp / backend / "run", tmp / backend / "ray", tmp / backend / "mlflow.db"
    cmd = [sys.executable, "-m", "launch", "train", "configs/tiny-cpu.yaml", *BACKENDS[backend],
           f"train.max_steps={args.steps}", f"train.eval_every_n_steps={args.eval_every}",
           f"checkpoint.every_n_steps={args.checkpoint_every}",
           "checkpoint.keep_last=2", f"output.dir={out}", f"tracking.uri=sqlite:///{store}"]  # fmt: skip
    ray_tmp.mkdir(parents=True)
    log = tmp / backend / "output.log"
    start = time.monotonic()
    with log.open("wb") as sink:
        # RAY_TMPDIR: this run's Ray session (its logs) in a directory of its own, to be measured.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**env, "RAY_TMPDIR": str(ray_tmp)}, stdout=sink, stderr=sink
        )
        samples = watch(
            proc, out, backend, args.sample_s, {"output": out, "mlflow": store, "ray_session": ray_tmp}
        )
    if proc.returncode != 0:
        raise SystemExit(f"{backend} run failed ({proc.returncode}); its output: {log}")
    text = log.read_bytes()
    checkpoints = sorted(
        p.name
        for p in (out / "checkpoints").rglob("*")
        if p.is_dir() and p.name.startswith(("step_", "checkpoint_"))
    )
    return {
        "backend": backend, "command": cmd, "wall_s": time.monotonic() - start, "samples": samples,
        "log_mb": len(text) / 2**20, "log_lines": text.count(b"\n"),
        "log_carriage_returns": text.count(b"\r"),
        "checkpoints_left": checkpoints, "summary": json.loads((out / "summary.json").read_text()),
    }  # fmt: skip


def slope_mb_per_10k(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (step, MB), in MB per 10,000 steps; None with too few distinct steps."""
    import numpy as np

    if len({s for s, _ in points}) < 3:
        return None
    steps, mb = np.array(points, dtype=float).T
    return float(np.polyfit(steps, mb, 1)[0] * 10_000)


def worker_rows(run: dict[str, Any], warmup: int) -> list[dict[str, Any]]:
    """Per worker: RssAnon at the end of warm-up and at the end, and the slopes after warm-up.

    The slopes leave out the samples taken at the last step: those are the run's end (the adapter's
    export, the summary, the loss curve), which adds its own ~20 MB once; a slope through them reads as
    growth per step what is a one-off."""
    rows = []
    pids = sorted({pid for s in run["samples"] for pid in s["rss_anon_mb"]}, key=int)
    last = max((s["step"] for s in run["samples"]), default=0)
    for i, pid in enumerate(pids):
        points = [(s["step"], s["rss_anon_mb"][pid]) for s in run["samples"] if pid in s["rss_anon_mb"]]
        after = [(step, mb) for step, mb in points if warmup <= step < last]
        half = [(step, mb) for step, mb in after if step >= (warmup + max(s for s, _ in points)) / 2]
        rows.append({
            "backend": run["backend"], "worker": i, "pid": int(pid),
            "rss_at_warmup_mb": after[0][1] if after else None,
            "rss_end_mb": points[-1][1] if points else None,
            "rss_max_mb": max(mb for _, mb in points) if points else None,
            "slope_mb_per_10k": slope_mb_per_10k(after),
            "second_half_slope_mb_per_10k": slope_mb_per_10k(half),
        })  # fmt: skip
    return rows


def plot(runs: list[dict[str, Any]], warmup: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, disk) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for run in runs:
        pids = sorted({pid for s in run["samples"] for pid in s["rss_anon_mb"]}, key=int)
        for i, pid in enumerate(pids):
            pts = [
                (s["step"], s["rss_anon_mb"][pid])
                for s in run["samples"]
                if pid in s["rss_anon_mb"] and s["step"]
            ]
            mem.plot(*zip(*pts, strict=True), label=f"{run['backend']} worker {i}", lw=1)
        for key in ("output_mb", "mlflow_mb", "ray_session_mb"):
            pts = [(s["step"], s[key]) for s in run["samples"] if s["step"]]
            if any(mb for _, mb in pts):
                disk.plot(*zip(*pts, strict=True), label=f"{run['backend']} {key.removesuffix('_mb')}", lw=1)
    mem.axvline(warmup, color="grey", ls=":", lw=1)
    mem.set_ylabel("RssAnon (MB)")
    mem.set_title("worker anonymous memory vs step (demo config)")
    mem.legend(fontsize=8)
    disk.set_ylabel("size on disk (MB)")
    disk.set_xlabel("step")
    disk.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1000, help="steps before the slopes are measured")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--backends", default="ray,local", help="comma-separated, of: " + ", ".join(BACKENDS))
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between two samples")
    parser.add_argument("--name", default="soak", help="results file name (bench/results/NAME.json, .png)")
    args = parser.parse_args()
    backends = args.backends.split(",")
    if min(args.steps, args.eval_every, args.checkpoint_every) < 1 or args.warmup < 0 or args.sample_s <= 0:
        parser.error("--steps, --eval-every and --checkpoint-every must be at least 1, --warmup at least 0 "
                     "and --sample-s positive")  # fmt: skip
    if unknown := [b for b in backends if b not in BACKENDS]:
        parser.error(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    runs = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        for backend in backends:
            print(f"{backend}: {args.steps} steps ...", flush=True)
            runs.append(soak(backend, args, Path(tmp), dict(os.environ)))
    rows = [row for run in runs for row in worker_rows(run, args.warmup)]
    print()
    print_table(rows, ["backend", "worker", "rss_at_warmup_mb", "rss_end_mb", "slope_mb_per_10k",
                       "second_half_slope_mb_per_10k"])  # fmt: skip
    disk = [{"backend": r["backend"], "output_mb_end": r["samples"][-1]["output_mb"],
             "output_mb_max": max(s["output_mb"] for s in r["samples"]),
             "ray_session_mb_end": r["samples"][-1]["ray_session_mb"], "log_lines": r["log_lines"],
             "log_carriage_returns": r["log_carriage_returns"],
             "checkpoints_left": len(r["checkpoints_left"])}
            for r in runs]  # fmt: skip
    print()
    print_table(disk, list(disk[0]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs, args.warmup, RESULTS / f"{args.name}.png")
    settings = {k: v for k, v in vars(args).items() if k != "name"}
    path = write_results(args.name, {**settings, "workers": rows, "disk": disk, "runs": runs})
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
