"""Sample answers during training: batched greedy decoding, the tasks, the local table and its summary."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.config import DataConfig
from trainer.data import DataError
from trainer.inference.generate import greedy_batch
from trainer.inference.samples import Sampler, read_tasks, summarize
from trainer.model import load_tokenizer
from trainer.tracking import NullTracker
from trainer.tracking.base import MetricsFile

pytestmark = pytest.mark.unit


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_batched_greedy_answers_equal_one_prompt_at_a_time() -> None:
    """Left padding and its mask change nothing: each answer is the unpadded prompt's own greedy answer."""
    model, tok = _model(), SimpleNamespace(pad_token_id=0, eos_token_id=2)
    prompts = [[1, 5, 9, 11, 7, 30], [1, 40], [1, 8, 8, 3]]
    together = greedy_batch(model, tok, prompts, max_new_tokens=6)
    alone = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, pad_token_id=0, eos_token_id=2)  # fmt: skip
        new = out[0, len(p) :].tolist()
        alone.append(new[: new.index(2)] if 2 in new else new)
    assert together == alone and all(len(a) > 0 for a in together)


def _instruction(path: Path) -> DataConfig:
    return DataConfig.model_validate(
        {"train_path": str(path), "eval_path": str(path), "format": "instruction"}
    )


def test_tasks_are_the_first_rows_and_a_bad_row_names_its_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "eval.jsonl"
    rows = [{"instruction": f"say {i}", "response": str(i)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = list(read_tasks(str(path), _instruction(path), tok, limit=3))
    assert [t.reference for t in tasks] == ["0", "1", "2"]
    assert tasks[0].prompt == "say 0" and tasks[0].ids[0] == tok.bos_token_id
    assert "say 0" in tok.decode(tasks[0].ids)  # inside the run's template
    path.write_text(path.read_text() + json.dumps({"instruction": 3, "response": "x"}) + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl: row 6: field 'instruction' must be a string"):
        list(read_tasks(str(path), _instruction(path), tok))


def test_no_sampler_for_text_rows_or_when_off(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    text = DataConfig.model_validate({"train_path": str(path), "eval_path": str(path), "format": "text"})
    assert Sampler.for_run(text, 4, 8, tok, synced=False) is None
    assert Sampler.for_run(_instruction(path), 0, 8, tok, synced=False) is None
    sampler = Sampler.for_run(_instruction(path), 4, 8, tok, synced=False)
    assert sampler is not None and len(sampler.tasks) == 1  # as many as the file holds


def test_the_table_is_kept_locally_cut_on_resume_and_summarised(tmp_path: Path) -> None:
    def rows(step: int, right: int) -> list[dict[str, object]]:
        return [{"step": step, "prompt": f"p{i}", "reference": "r", "generation": "r" if i < right else "x",
                 "exact": i < right} for i in range(4)]  # fmt: skip

    tracker = MetricsFile(tmp_path / "metrics.jsonl", NullTracker())
    for step, right in ((0, 0), (5, 2), (10, 3)):
        tracker.log_metrics({"eval/loss": 1.0}, step)
        tracker.log_table(rows(step, right), "samples")
    tracker.finish()
    summary = summarize(tmp_path / "samples.jsonl")
    assert summary["exact_match_first"] == 0.0 and summary["exact_match"] == 0.75
    assert summary["sample_prompts"] == 4 and [r["step"] for r in summary["samples_last"]] == [10, 10]
    resumed = MetricsFile(tmp_path / "metrics.jsonl", NullTracker(), resumed_at=5)  # step 10 is replayed
    resumed.finish()
    assert summarize(tmp_path / "samples.jsonl")["exact_match"] == 0.5


def test_a_fresh_run_in_a_used_directory_starts_its_records_over(tmp_path: Path) -> None:
    """`make demo` twice: the second run's summary reads its own 64 answers, not 128 (the first's too)."""
    first = MetricsFile(tmp_path / "metrics.jsonl", NullTracker())
    first.log_metrics({"eval/loss": 2.0}, 300)
    first.log_table(
        [{"step": 300, "prompt": "p", "reference": "r", "generation": "r", "exact": True}], "samples"
    )
    first.finish()
    again = MetricsFile(tmp_path / "metrics.jsonl", NullTracker())
    again.log_table(
        [{"step": 300, "prompt": "p", "reference": "r", "generation": "x", "exact": False}], "samples"
    )
    again.finish()
    assert summarize(tmp_path / "samples.jsonl")["exact_match"] == 0.0
    assert (tmp_path / "metrics.jsonl").read_text() == ""
