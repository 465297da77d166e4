"""A real run on chat data, packed and streamed: the metrics and the summary carry the data's counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, write_config
from trainer.config import RunConfig

pytestmark = pytest.mark.integration


def test_packed_streamed_chat_run(make_config: Callable[..., RunConfig], tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (ROOT / "data" / "tiny" / "train.jsonl").read_text().splitlines()]
    chats = [
        {
            "messages": [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in rows[:120]
    ]
    chats[5] = {"messages": []}  # skipped and counted
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "run"
    cfg = make_config(
        f"data.train_path={path}", "data.eval_path=null", "data.format=chat", "data.packing=true",
        "data.streaming=true", "data.shuffle_buffer=64", "data.max_seq_len=256", "data.on_bad_row=skip",
        f"data.cache_dir={tmp_path}/cache", "train.max_steps=3", "train.micro_batch_size=2",
        "train.dtype=fp32", f"output.dir={out}",
    )  # fmt: skip
    run_cli("train", str(write_config(cfg, tmp_path / "chat.yaml")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["data/bad_rows_empty_messages"] == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train/loss" in m]
    assert len(steps) == 3 and all(0.5 < m["train/packing_efficiency"] <= 1 for m in steps)
    assert all(m["data/bad_rows"] == 1 for m in steps)
