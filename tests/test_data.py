"""Data in: sources, formats, loss masks, bad rows, the tokenisation cache and the eval split.

Every file is written by the test; tokens come from the session's tiny tokenizer. Expected tokens are
built independently (the tokenizer called on the documented template), never by the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trainer import config as config_lib
from trainer.config import ConfigError, DataConfig, DataSource
from trainer.data import DataError, build_data
from trainer.data import tokenized as tokenized_lib
from trainer.data.build import tokenize_sources
from trainer.data.formats import IGNORE_INDEX, make_encoder
from trainer.data.sources import resolve

pytestmark = pytest.mark.unit

ROWS = [
    {"instruction": "Why is the sky blue?", "response": "Air scatters blue light most."},
    {"instruction": "Name a prime.", "response": "Seven.", "input": "between 5 and 10"},
    {"instruction": "What is ice?", "response": "Frozen water."},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg(tmp_path: Path, train: Any, **fields: Any) -> DataConfig:
    return DataConfig(train_path=train, cache_dir=str(tmp_path / "cache"), **fields)


def docs(c: DataConfig, tok: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    data, _, _, _ = tokenize_sources(c, tok)
    return [data[i] for i in range(len(data))]


def reference_instruction(row: dict[str, str], tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Alpaca-style rendering by hand: prompt (with BOS) carries no loss; response and EOS do."""
    if row.get("input"):
        prompt = f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
    else:
        prompt = f"### Instruction:\n{row['instruction']}\n\n### Response:\n"
    p = tok(prompt)["input_ids"]
    r = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + r, [IGNORE_INDEX] * len(p) + r


def test_instruction_format_matches_the_template_by_hand(
    tmp_path: Path, tok: PreTrainedTokenizerBase
) -> None:
    got = docs(cfg(tmp_path, str(write_jsonl(tmp_path / "a.jsonl", ROWS))), tok)
    for row, doc in zip(ROWS, got, strict=True):
        ids, labels = reference_instruction(row, tok)
        assert doc["input_ids"] == ids and doc["labels"] == labels
        assert doc["n_loss"] == sum(t != IGNORE_INDEX for t in labels[1:]) and doc["length"] == len(ids)


def test_instruction_fields_and_template_are_configurable(
    tmp_path: Path, tok: PreTrainedTokenizerBase
) -> None:
    rows = [{"q": "Two plus two?", "a": "Four."}]
    c = cfg(tmp_path, str(write_jsonl(tmp_path / "q.jsonl", rows)), prompt_field="q", response_field="a",
            prompt_template="Q: {prompt}\nA: ", train_on_prompt=True)  # fmt: skip
    (doc,) = docs(c, tok)
    ids = tok("Q: Two plus two?\nA: ")["input_ids"] + tok("Four.", add_special_tokens=False)["input_ids"]
    assert doc["input_ids"] == [*ids, tok.eos_token_id] and doc["labels"] == doc["input_ids"]


def test_text_format_trains_on_every_token(tmp_path: Path, tok: PreTrainedTokenizerBase) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "Rain falls from clouds."}])
    (doc,) = docs(cfg(tmp_path, str(path), format="text", text_field="body"), tok)
    assert doc["input_ids"] == [*tok("Rain falls from clouds.")["input_ids"], tok.eos_token_id]
    assert doc["labels"] == doc["input_ids"] and doc["input_ids"][0] == tok.bos_token_id


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Rayleigh scattering."},
    {"role": "user", "content": "And sunsets?"},
    {"role": "assistant", "content": "A longer path, so red light."},
]


def check_tokens(
    ids: list[int], labels: list[int], tok: PreTrainedTokenizerBase, text: str, spans: list[str]
) -> None:
    """Token by token: the tokens spell ``text``; a token carries loss iff it lies inside one of ``spans``."""
    pieces = [tok.decode([t]) for t in ids]
    assert "".join(pieces) == text
    inside = [False] * len(text)
    for span in spans:
        start = text.index(span)
        inside[start : start + len(span)] = [True] * len(span)
    at = 0
    for k, piece in enumerate(pieces):
        flags = set(inside[at : at + len(piece)])
        assert len(flags) == 1, f"token {k} {piece!r} straddles an assistant boundary"
        assert labels[k] == (ids[k] if flags.pop() else IGNORE_INDEX), f"token {k} {piece!r}"
        at += len(piece)


def test_chat_default_template_text_and_mask_token_by_token(
    tmp_path: Path, tok: PreTrainedTokenizerBase
) -> None:
    assert tok.chat_template is None  # the tiny tokenizer has none: the documented default applies
    (doc,) = docs(
        cfg(tmp_path, str(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])), format="chat"), tok
    )
    text = (
        "<|bos|><|system|>\nBe brief.\n<|user|>\nWhy is the sky blue?\n<|assistant|>\nRayleigh scattering."
        "<|eos|>\n<|user|>\nAnd sunsets?\n<|assistant|>\nA longer path, so red light.<|eos|>\n"
    )
    spans = ["Rayleigh scattering.<|eos|>\n", "A longer path, so red light.<|eos|>\n"]
    check_tokens(doc["input_ids"], doc["labels"], tok, text, spans)
    assert doc["input_ids"].count(tok.eos_token_id) == 2 and doc["input_ids"][0] == tok.bos_token_id


def test_chat_uses_the_tokenizers_template_and_train_on_prompt(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    path = str(write_jsonl(tmp_path / "c.jsonl", [{"conv": CHAT[1:3]}]))
    (doc,) = docs(cfg(tmp_path, path, format="chat", messages_field="conv"), tok)
    text = (
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\nRayleigh scattering.<|im_end|>\n"
    )
    check_tokens(doc["input_ids"], doc["labels"], tok, text, ["Rayleigh scattering.<|im_end|>\n"])
    (everything,) = docs(cfg(tmp_path, path, format="chat", messages_field="conv", train_on_prompt=True), tok)
    assert everything["labels"] == everything["input_ids"] == doc["input_ids"]


def write_sources(tmp_path: Path) -> dict[str, str]:
    """ROWS in every supported kind of source."""
    table = pa.Table.from_pylist([{"instruction": r["instruction"], "response": r["response"],
                                   "input": r.get("input", "")} for r in ROWS])  # fmt: skip
    out = {"jsonl": str(write_jsonl(tmp_path / "rows.jsonl", ROWS))}
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    out["json"] = str(tmp_path / "rows.json")
    ds = datasets.Dataset(table)
    ds.to_csv(str(tmp_path / "rows.csv"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for i, row in enumerate(ROWS):
        write_jsonl(tmp_path / f"part-{i}.jsonl", [row])
    out |= {k: str(tmp_path / f"rows.{k}") for k in ("csv", "parquet", "arrow")}
    return out | {
        "saved": str(tmp_path / "saved"),
        "dict": str(tmp_path / "saved_dict"),
        "glob": str(tmp_path / "part-*.jsonl"),
    }


def test_every_source_kind_gives_the_same_examples(tmp_path: Path, tok: PreTrainedTokenizerBase) -> None:
    sources = write_sources(tmp_path)
    want = [reference_instruction(r, tok) for r in ROWS]
    for kind, path in sources.items():
        got = [(d["input_ids"], d["labels"]) for d in docs(cfg(tmp_path, path), tok)]
        assert got == want, kind
    assert len(resolve(DataSource(path=sources["glob"])).files) == 3


def test_hub_names_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="hub data sets are never downloaded"):
        resolve(DataSource(path="tatsu-lab/alpaca"))
    with pytest.raises(DataError, match="no such file"):
        resolve(DataSource(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="matches no file"):
        resolve(DataSource(path=str(tmp_path / "*.parquet")))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        resolve(DataSource(path=str(tmp_path / "plain")))


BAD = [
    ROWS[0],
    {"instruction": "No answer."},  # row 2: missing field
    {"instruction": "Typed.", "response": 5},  # row 3: wrong type
    "",  # row 4: a blank line is no row
    "{not json",  # row 5
    ROWS[2],
    {"instruction": "Empty.", "response": ""},  # row 7
    {"instruction": "Long. " * 40, "response": "Too long."},  # row 8: over max_seq_len without truncate
]


def test_bad_row_error_names_file_and_row(tmp_path: Path, tok: PreTrainedTokenizerBase) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(DataError, match=rf"{path}: row 2: field 'response' is missing \(5 bad rows"):
        docs(cfg(tmp_path, str(path), max_seq_len=64, truncate=False), tok)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": []}])
    with pytest.raises(DataError, match=rf"{chat}: row 2: field 'messages' has no messages"):
        docs(cfg(tmp_path, str(chat), format="chat"), tok)


def test_bad_rows_skipped_are_counted_exactly(make_config: Callable[..., Any], tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", BAD * 4)  # 8 good rows, 24 bad
    run = make_config(f"data.train_path={path}", f"data.eval_path={path}", "data.on_bad_row=skip",
                      "data.truncate=false", "data.max_seq_len=64", f"data.cache_dir={tmp_path}/c",
                      "train.micro_batch_size=2")  # fmt: skip
    plan, _ = build_data(run, AutoTokenizer.from_pretrained(run.model.path), rank=0, world_size=1)
    kinds = {"missing_field": 4, "wrong_type": 4, "invalid_json": 4, "empty_field": 4, "too_long": 4}
    want = {
        "data/train_examples": 8.0,
        "data/bad_rows": 20.0,
        "data/eval_examples": 8.0,
        "data/eval_bad_rows": 20.0,
    }
    want |= {f"data/bad_rows_{k}": float(n) for k, n in kinds.items()}
    want |= {f"data/eval_bad_rows_{k}": float(n) for k, n in kinds.items()}
    assert plan.stats() == want | {"data/truncated": 0.0, "data/eval_truncated": 0.0}


def test_truncated_examples_stay_and_are_counted(tmp_path: Path, tok: PreTrainedTokenizerBase) -> None:
    """Cut to max_seq_len even if no loss token is left (as before); only a row with nothing to learn
    in the first place (a conversation without an assistant turn) is bad."""
    rows = [ROWS[0], {"instruction": "Long. " * 80, "response": "Cut."}, ROWS[2]]
    limit = max(len(reference_instruction(r, tok)[0]) for r in (ROWS[0], ROWS[2]))  # the others fit
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    data, _, _, seen = tokenize_sources(cfg(tmp_path, path, max_seq_len=limit), tok)
    assert len(data) == 3 and seen == {"truncated": 1}
    assert data[1]["length"] == limit and data[1]["n_loss"] == 0  # the prompt alone fills it
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    with pytest.raises(DataError, match=rf"{chat}: row 2: no token carries loss"):
        docs(cfg(tmp_path, str(chat), format="chat"), tok)


def test_tokenisation_cache_hits_and_misses(
    tmp_path: Path, tok: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    first = docs(cfg(tmp_path, str(path)), tok)
    entries = {p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()}
    assert len(entries) == 1
    with monkeypatch.context() as m:  # a hit never reads the raw file
        m.setattr(tokenized_lib, "load", lambda f: pytest.fail("the cache missed"))
        assert docs(cfg(tmp_path, str(path), on_bad_row="skip"), tok) == first  # policy is not in the key
    docs(cfg(tmp_path, str(path), prompt_template="Q: {prompt}\n"), tok)  # the template is
    write_jsonl(path, ROWS[:2])  # and so is the content
    assert len(docs(cfg(tmp_path, str(path)), tok)) == 2
    assert len({p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()}) == 3


def test_eval_fraction_is_fixed_by_its_seed(make_config: Callable[..., Any], tmp_path: Path) -> None:
    rows = [{"instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(50)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)

    def held(*extra: str) -> list[list[int]]:
        run = make_config(f"data.train_path={path}", "data.eval_path=null", "data.eval_fraction=0.2",
                          f"data.cache_dir={tmp_path}/c", "train.micro_batch_size=2", *extra)  # fmt: skip
        plan, evals = build_data(run, AutoTokenizer.from_pretrained(run.model.path), rank=0, world_size=1)
        assert plan.stats()["data/train_examples"] == 40 and plan.stats()["data/eval_examples"] == 10
        trained = {
            tuple(r[r != 0].tolist())
            for s in range(20)
            for b in plan.for_step(s).micro_batches
            for r in b["input_ids"]
        }
        evaluated = [r[r != 0].tolist() for b in evals for r in b["input_ids"]]
        assert not trained & {tuple(e) for e in evaluated}
        return sorted(evaluated)

    assert held("train.seed=1") == held("train.seed=2") != held("data.eval_seed=5")


def test_config_rejects_inconsistent_data_settings(tmp_path: Path) -> None:
    base = {"model": {"path": "m"}, "output": {"dir": "o"}}
    for data, message in [
        ({"train_path": "a", "streaming": True}, "streaming needs shuffle_buffer"),
        ({"train_path": "a", "eval_path": "b", "eval_fraction": 0.1}, "exclusive"),
        ({"train_path": [{"path": "a", "weight": 0}]}, "weight: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_lib.validate(base | {"data": data})


def test_encoder_never_raises_and_marks_blank_lines(tok: PreTrainedTokenizerBase) -> None:
    encode = make_encoder(DataConfig(train_path="x"), tok)
    out = encode({"__json__": ["   ", json.dumps(ROWS[0]), "[1, 2]"]})
    assert out["length"][0] == 0 and out["bad"][0] == ""
    assert out["length"][1] > 0 and out["bad"][1] == ""
    assert out["length"][2] == 0 and out["bad"][2].startswith("wrong_type\t")
