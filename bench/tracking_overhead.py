"""What logging a step's metrics costs the training loop: MLflow called inline vs our background sender.

    python -m bench.tracking_overhead [--rows 200]

For each store (the embedded sqlite store, a local ``mlflow server`` over HTTP, a server that is down)
it times, on the caller's thread, one ``log_metrics`` per step of a typical row (12 metrics): inline
``MlflowClient.log_batch`` (what the skeleton did) and ``MlflowTracker.log_metrics`` (enqueue only), and
how long the sender then takes to deliver everything. Also the per-rank peak-memory gather (one
all-reduce). Variants run side by side in one process; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from bench.common import print_table, write_results
from trainer.config import TrackingConfig
from trainer.tracking import MlflowTracker

METRICS = [
    "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s", "train/epoch",
    "train/preconditioner_fallbacks", "system/memory_peak_mb", "system/memory_peak_mb.rank0",
    "system/memory_peak_mb.rank1",
    "eval/loss", "train/tokens",
]  # fmt: skip


def _row(step: int) -> dict[str, float]:
    return {name: float(step) / (i + 1) for i, name in enumerate(METRICS)}


def _latencies(call: Callable[[int], object], rows: int) -> list[float]:
    out = []
    for step in range(1, rows + 1):
        start = time.perf_counter()
        call(step)
        out.append(time.perf_counter() - start)
    return out


def _stats(name: str, store: str, lat: list[float], drain_s: float | None) -> dict[str, Any]:
    ordered = sorted(lat)
    return {
        "variant": name,
        "store": store,
        "median_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * ordered[int(0.99 * (len(ordered) - 1))],
        "max_ms": 1e3 * ordered[-1],
        "caller_total_s": sum(lat),
        "drain_s": drain_s,
    }


def inline(uri: str, rows: int) -> dict[str, Any]:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench") or client.get_experiment(
        client.create_experiment("bench")
    )
    run_id = client.create_run(experiment.experiment_id, run_name="inline").info.run_id

    def call(step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in _row(step).items()])

    lat = _latencies(call, rows)
    client.set_terminated(run_id)
    return _stats("inline log_batch", uri.split(":")[0], lat, None)


def queued(uri: str, rows: int, label: str, drain_timeout_s: float = 120) -> dict[str, Any]:
    cfg = TrackingConfig(uri=uri, experiment="bench", run_name="queued", system_metrics=False,
                         drain_timeout_s=drain_timeout_s, retry_max_s=1.0)  # fmt: skip
    tracker = MlflowTracker(cfg)
    lat = _latencies(lambda step: tracker.log_metrics(_row(step), step), rows)
    start = time.perf_counter()
    summary = tracker.flush()
    drain = time.perf_counter() - start
    tracker.finish()
    assert summary["mlflow_metric_rows"] == rows
    return _stats("sender log_metrics", label, lat, drain) | {
        "dropped": summary["mlflow_metric_rows_dropped"]
    }


def memory_gather(rows: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from trainer.tracking import memory_metrics

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            lat = _latencies(lambda step: memory_metrics(torch.device("cpu")), rows)
        finally:
            dist.destroy_process_group()
    return _stats("peak-memory gather", "gloo, 1 rank", lat, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    from tests.mlflow_server import MlflowServer, free_port

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        results += [inline(sqlite, args.rows), queued(sqlite, args.rows, "sqlite")]
        server = MlflowServer(Path(tmp))
        server.start()
        try:
            results += [inline(server.uri, args.rows), queued(server.uri, args.rows, "http")]
        finally:
            server.stop()
        down = f"http://127.0.0.1:{free_port()}"
        results.append(queued(down, args.rows, "http, server down", drain_timeout_s=2))
    results.append(memory_gather(args.rows))
    by_store = {r["store"]: r for r in results if r["variant"] == "inline log_batch"}
    for r in results:
        base = by_store.get(r["store"].split(",")[0])
        r["vs_inline"] = r["median_ms"] / base["median_ms"] if base else None
    print_table(results, ["variant", "store", "median_ms", "p99_ms", "max_ms", "caller_total_s", "drain_s",
                          "vs_inline"])  # fmt: skip
    print(f"\n{args.rows} rows of {len(METRICS)} metrics each; vs_inline: median caller latency / inline's")
    print(f"results: {write_results('tracking_overhead', {'rows': args.rows, 'results': results})}")


if __name__ == "__main__":
    main()
