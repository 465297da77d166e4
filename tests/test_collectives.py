"""What 2 real gloo processes see (tests/dist_checks.py): SARA and Mo-SARA take rank 0's SVD on every
rank, the configured collective timeout is the process group's, DeepSpeed runs with the ZeRO buckets
the generated config asks for, and the vocabulary-sharded modules compute what the whole matrix does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _check(check: str, out: Path, *args: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "tests.dist_checks", check, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"{check}-rank{rank}.json").read_text()) for rank in range(2)]


def test_sara_and_mosara_take_rank0s_svd_on_every_rank(tmp_path: Path) -> None:
    """Rank 1's weights have another spectrum (as another GPU's SVD may round): by its own SVD it would
    choose other ranks (DeepSpeed then hangs on the shapes) and other singular vectors (silently other
    updates). Both ranks must train rank 0's."""
    first, second = _check("agree", tmp_path)
    assert first["own_ranks"] != second["own_ranks"], "the ranks' own SVDs agree: the check shows nothing"
    assert (
        first["sara_ranks"] == second["sara_ranks"] == dict(zip(["0", "1"], first["own_ranks"], strict=True))
    )
    assert first["mosara_ranks"] == second["mosara_ranks"]
    assert first["mosara_u"] == second["mosara_u"] and first["mosara_v"] == second["mosara_v"]


def test_a_wait_longer_than_the_collective_timeout_fails_and_a_shorter_one_passes(tmp_path: Path) -> None:
    """distributed.collective_timeout_s reaches the group init_distributed creates: with 2 s, a rank
    waiting 6 s for rank 0 at a barrier fails after 2 s; with 60 s, a 4 s wait passes."""
    _, waiting = _check("timeout", tmp_path / "short", "--timeout-s", "2", "--late-s", "6")
    assert waiting["error"] and "Timed out" in waiting["error"], waiting
    assert 1.5 < waiting["waited_s"] < 5.0, waiting
    _, waiting = _check("timeout", tmp_path / "long", "--timeout-s", "60", "--late-s", "4")
    assert waiting["error"] is None and waiting["waited_s"] > 3.0, waiting


def test_deepspeed_runs_with_buckets_sized_from_the_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The engine's ZeRO-2 optimizer holds the generated sizes, not DeepSpeed's 5e8-element default."""
    from trainer.engine import zero_bucket_elements

    for rank in _check("buckets", tmp_path, "--model", str(tiny_model_dir)):
        expected = zero_bucket_elements(rank["trainable"])
        assert rank["reduce_bucket_size"] == rank["allgather_bucket_size"] == expected < 5 * 10**8, rank


def test_vocabulary_sharded_embedding_head_and_loss_equal_the_whole_matrix(tmp_path: Path) -> None:
    """Each rank holds half the rows and has its own number of tokens (5 and 9): the lookup and the
    logits are bit-equal to the whole matrix's; the loss and its hidden-state gradient equal it to fp32
    rounding, and in bf16 to one bf16 rounding of the gradient (each rank's partial product is rounded
    before the ranks' sum), whole or in chunks of 3 tokens."""
    ranks = _check("vocab", tmp_path)
    assert [r["rows"] for r in ranks] == [[0, 7], [7, 14]]
    for r in ranks:
        for dtype in ("float32", "bfloat16"):
            assert r[f"{dtype}_embedding"] == 0.0 and r[f"{dtype}_logits"] == 0.0, r
            for chunk in (0, 3):
                assert r[f"{dtype}_loss_rel_chunk{chunk}"] < 1e-6, r
                assert r[f"{dtype}_grad_rel_chunk{chunk}"] < (1e-6 if dtype == "float32" else 8e-3), r
