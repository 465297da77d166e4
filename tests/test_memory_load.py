"""Under ZeRO-3 a rank's peak memory should shrink as workers are added: the base is sharded as it loads.

Runs bench.memory_load's own variant runner (RssAnon sampled every 50 ms in each worker, glibc's mmap
threshold fixed so freed tensors leave the process) on a small Llama whose 4-bit base is 0.18 GB, at 1
and 2 workers.

Measured (2026-12-01, this 2-core machine): peak above start-up while loading 0.244 GB at N=1;
at N=2 rank 0 0.150 GB (its share did shrink by about half the base) but rank 1 0.270 GB, and over
the training step 0.27 -> 0.33 GB. So the per-rank peak does not yet shrink with N on this model
(see docs/memory.md: ZeRO-3's working set, gathered embedding/head and prefetch bucket, exceeds this
whole base, and rank 1 holds ~0.12 GB more than rank 0 while loading, not yet explained). The strict
xfail turns into a failure the day it does shrink, so that the bar is then kept.
"""

from __future__ import annotations

import argparse

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs() -> tuple[int, list[dict], list[dict]]:
    from bench.memory_load import base_bytes, build_checkpoint, run_variant

    model = build_checkpoint(layers=8, hidden=1024, vocab=32000)
    base, _ = base_bytes(str(model))
    args = argparse.Namespace(model=str(model), steps=1, length=32)
    one, two = (run_variant(args, "stream", 3, n, malloc_mmap_threshold=1 << 16) for n in (1, 2))
    return base, one, two


def _share(rank: dict, phase: str) -> int:
    return int(rank[f"peak_{phase}"] - rank["peak_start"])


def test_rank0_keeps_about_half_the_base_at_two_workers(runs: tuple[int, list[dict], list[dict]]) -> None:
    base, one, two = runs
    assert _share(one[0], "load") > 0.8 * base
    assert _share(two[0], "load") < _share(one[0], "load") - 0.3 * base


@pytest.mark.xfail(strict=True, reason="per-rank peak does not shrink with N yet (docs/memory.md)")
def test_every_ranks_peak_shrinks_with_more_workers(runs: tuple[int, list[dict], list[dict]]) -> None:
    base, one, two = runs
    for phase in ("load", "steps"):
        assert max(_share(r, phase) for r in two) < _share(one[0], phase) - 0.3 * base, phase
