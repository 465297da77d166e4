"""Under ZeRO-3 a rank's peak memory shrinks as workers are added: the base is sharded as it loads.

Runs bench.memory_load's own variant runner (RssAnon sampled every 50 ms in each worker) on a small
Llama whose 4-bit base (~0.17 GB, most of it the bf16 embeddings and head) dwarfs the noise of the
runtime's own allocations, at 1 and 2 workers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_zero3_per_rank_peak_shrinks_with_more_workers(tmp_path: Path) -> None:
    from bench.memory_load import base_bytes, build_checkpoint, run_variant

    model = build_checkpoint(layers=8, hidden=1024, vocab=32000)
    base, layer = base_bytes(str(model))
    args = argparse.Namespace(model=str(model), steps=1, length=32)
    one, two = (run_variant(args, "stream", 3, n, malloc_mmap_threshold=1 << 16) for n in (1, 2))

    def share(ranks: list[dict], phase: str) -> float:
        return max(r[f"peak_{phase}"] - r["peak_start"] for r in ranks)

    # Loading: N=1 holds the whole base; N=2 half of it plus one layer in flight. The bar leaves room
    # for the runtime's noise but not for a second copy: halving the base must show.
    assert share(one, "load") > 0.8 * base, (share(one, "load"), base)
    assert share(two, "load") < share(one, "load") - 0.3 * base, (share(two, "load"), share(one, "load"))
    # and training: the peak over the steps shrinks too
    assert max(r["peak_steps"] for r in two) < max(r["peak_steps"] for r in one)
    assert layer < 0.1 * base
