"""The data pipeline alone: tokenisation and batching throughput, and packing efficiency.

    python -m bench.data_pipeline [--rows 20000]

1. Tokenisation (cold cache, 1 vs 2 processes, then a cache hit) of the shipped rows repeated to
   ``--rows``, in the instruction and chat formats: tokens/s.
2. Batching (map-style and streaming, padded and packed): tokens/s of for_step over an epoch.
3. Packing efficiency (real tokens / computed slots, the metric a run logs) on the shipped data at
   the demo's max_seq_len and longer, and on a synthetic long-tailed length distribution (log-normal,
   median 250 tokens, up to 4096): padded micro-batches vs next-fit vs best-fit decreasing per window.

Writes bench/results/data_pipeline.json and data_pipeline.png. The tokenizer is the demo's (byte-level
BPE, 1024 tokens, trained on the shipped data), built here in a second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, print_table, write_results
from trainer.config import RunConfig, validate
from trainer.data import MapBatches, build_data, pack
from trainer.model import corpus_texts, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / "data" / "tiny" / "train.jsonl", ROOT / "data" / "tiny" / "eval.jsonl"]
MICRO = 8


def run_config(train: str, work: Path, *overrides: tuple[str, Any]) -> RunConfig:
    data: dict[str, Any] = {"train_path": train, "cache_dir": str(work / "cache"), "max_seq_len": 512}
    data |= dict(overrides)
    raw = {
        "model": {"path": "unused"},
        "data": data,
        "train": {"micro_batch_size": MICRO},
        "output": {"dir": "o"},
    }
    return validate(raw)


def write_corpus(work: Path, n: int) -> dict[str, str]:
    rows = [json.loads(line) for p in SHIPPED for line in p.read_text().splitlines()]
    picked = [rows[i % len(rows)] for i in range(n)]
    chat = [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["response"]}]} for r in picked]  # fmt: skip
    out = {}
    for name, items in (("instruction", picked), ("chat", chat)):
        out[name] = str(work / f"{name}.jsonl")
        Path(out[name]).write_text("".join(json.dumps(r) + "\n" for r in items))
    return out


def tokenisation(tok: Any, work: Path, corpus: dict[str, str]) -> list[dict[str, Any]]:
    results = []
    for fmt, path in corpus.items():
        base = None
        for procs, label in ((1, "cold, 1 proc"), (2, "cold, 2 procs"), (1, "cache hit")):
            cache = work / f"cache-{fmt}-{procs}"
            cfg = run_config(path, work, ("format", fmt), ("num_proc", procs), ("cache_dir", str(cache)))
            start = time.perf_counter()
            plan, _ = build_data(cfg, tok, rank=0, world_size=1)
            seconds = time.perf_counter() - start
            assert isinstance(plan, MapBatches)
            tokens = sum(plan.store.lengths)
            base = base or seconds
            rows = len(plan.store.lengths)
            speedup = base / seconds
            rate = tokens / seconds
            results.append(
                dict(format=fmt, run=label, rows=rows, tokens_per_s=rate, seconds=seconds, speedup=speedup)
            )
    return results


def batching(tok: Any, work: Path, path: str, steps: int) -> list[dict[str, Any]]:
    results = []
    for packing in (False, True):
        for streaming in (False, True):
            cfg = run_config(
                path, work, ("packing", packing), ("streaming", streaming), ("shuffle_buffer", 1024)
            )
            plan, _ = build_data(cfg, tok, rank=0, world_size=1)
            start, tokens, eff = time.perf_counter(), 0, []
            for step in range(steps):
                batch = plan.for_step(step)
                tokens += batch.global_tokens
                eff.append(batch.metrics["train/packing_efficiency"])
            seconds = time.perf_counter() - start
            rate = tokens / seconds
            eff_mean = float(np.mean(eff))
            row = dict(packing=packing, streaming=streaming, tokens_per_s=rate, steps_per_s=steps / seconds)
            results.append(row | {"packing_efficiency": eff_mean})
    return results


def slots_efficiency(rows: list[int], micro: int = MICRO) -> float:
    """Real tokens / (rows x padded width) over micro-batches of consecutive rows (as runs log it)."""
    chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
    return sum(rows) / sum(len(c) * max(c) for c in chunks)


def next_fit(lengths: list[int], capacity: int) -> list[int]:
    rows, room = [], 0
    for n in lengths:
        if n > room:
            rows.append(0)
            room = capacity
        rows[-1] += n
        room -= n
    return rows


def best_fit(lengths: list[int], capacity: int, window: int | None) -> list[int]:
    rows: list[int] = []
    step = window or len(lengths)
    for i in range(0, len(lengths), step):
        part = lengths[i : i + step]
        rows += [sum(part[j] for j in b) for b in pack(part, capacity)]
    random.Random(0).shuffle(rows)  # rows are shuffled after packing, as in the pipeline
    return rows


def strategies(lengths: list[int], capacity: int) -> list[dict[str, Any]]:
    lengths = [min(n, capacity) for n in lengths]  # data.truncate
    rows = {
        "padded (no packing)": lengths,
        "next-fit": next_fit(lengths, capacity),
        **{f"best-fit, window {w}": best_fit(lengths, capacity, w) for w in (64, 1024, 10_000)},
        "best-fit, whole set": best_fit(lengths, capacity, None),
    }
    base = slots_efficiency(rows["padded (no packing)"])
    return [{"capacity": capacity, "strategy": k, "rows": len(r), "efficiency": slots_efficiency(r),
             "vs_padded": slots_efficiency(r) / base} for k, r in rows.items()]  # fmt: skip


def shipped_lengths(tok: Any, work: Path) -> list[int]:
    cfg = run_config(str(SHIPPED[0]), work, ("max_seq_len", 4096))
    plan, _ = build_data(cfg, tok, rank=0, world_size=1)
    assert isinstance(plan, MapBatches)
    lengths = plan.store.lengths
    return [lengths[i] for i in torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))]


def synthetic_lengths(n: int = 20_000) -> list[int]:
    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(np.log(250), 1.0, n), 16, 4096).astype(int).tolist()


def plot(packing: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["data"], r["capacity"]) for r in packing})
    names = list(dict.fromkeys(r["strategy"] for r in packing))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        value = {(r["data"], r["capacity"]): r["efficiency"] for r in packing if r["strategy"] == name}
        values = [value[g] for g in groups]
        ax.bar(np.arange(len(groups)) + k * width, values, width, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{d}\nmax_seq_len {c}" for d, c in groups])
    ax.set_ylabel("real tokens / computed slots")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Packing efficiency (micro-batches of 8 rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the tokenisation corpus")
    parser.add_argument("--steps", type=int, default=500, help="steps of the batching benchmark")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tok = train_tokenizer(list(corpus_texts([str(SHIPPED[0])])), 1024)  # the demo's tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(work, args.rows)
        tokens = tokenisation(tok, work, corpus)
        batches = batching(tok, work, corpus["instruction"], args.steps)
        shipped = shipped_lengths(tok, work)
    packing = [{"data": "shipped", **r} for c in (192, 512, 1024) for r in strategies(shipped, c)]
    packing += [
        {"data": "long-tailed", **r} for c in (2048, 4096) for r in strategies(synthetic_lengths(), c)
    ]
    print_table(tokens, ["format", "run", "rows", "tokens_per_s", "seconds", "speedup"])
    print()
    print_table(batches, ["packing", "streaming", "tokens_per_s", "steps_per_s", "packing_efficiency"])
    print()
    print_table(packing, ["data", "capacity", "strategy", "rows", "efficiency", "vs_padded"])
    payload = {"tokenisation": tokens, "batching": batches, "packing": packing, "args": vars(args)}
    print(f"\nwrote {write_results('data_pipeline', payload)}")
    plot(packing, RESULTS / "data_pipeline.png")


if __name__ == "__main__":
    main()
