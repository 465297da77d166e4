"""Data out: packing, the packed loss, sharding across ranks, mixtures, streaming and resuming."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from trainer.config import RunConfig
from trainer.data import GlobalBatches, MapBatches, build_data, collate_packed, collate_padded, pack
from trainer.loop import forward_logits, token_loss_sum

pytestmark = pytest.mark.unit


def qa_rows(n: int, tag: str, rng: random.Random) -> list[dict[str, str]]:
    """Rows of varied lengths (a long tail), so packing has something to do."""
    words = ["sun", "rain", "wind", "cloud", "river", "stone", "light", "shadow", "field"]
    return [
        {
            "instruction": f"{tag} question {i}?",
            "response": " ".join(rng.choices(words, k=rng.choice([1, 2, 4, 25]))),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("data")
    out = {}
    for name, n in (("a", 90), ("b", 30)):
        rows: list[Any] = qa_rows(n, name, rng)
        rows.insert(7, {"instruction": "broken"})  # one bad row in each, for skip mode
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture()
def plan_for(
    make_config: Callable[..., RunConfig], files: dict[str, Path], tmp_path: Path
) -> Callable[..., GlobalBatches]:
    def make(*overrides: str, world: int = 1, rank: int = 0) -> GlobalBatches:
        run = make_config(
            f"data.train_path=[{{path: {files['a']}, weight: 3}}, {{path: {files['b']}, weight: 1}}]",
            "data.eval_path=null", "data.on_bad_row=skip", f"data.cache_dir={tmp_path}/cache",
            "data.max_seq_len=128", "train.micro_batch_size=2", "train.grad_accum_steps=2", *overrides,
        )  # fmt: skip
        tok = AutoTokenizer.from_pretrained(run.model.path)
        return build_data(run, tok, rank=rank, world_size=world)[0]

    return make


def assert_same(a: Any, b: Any) -> None:
    assert len(a.micro_batches) == len(b.micro_batches) and a.global_loss_tokens == b.global_loss_tokens
    for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_pack_matches_a_naive_best_fit_decreasing() -> None:
    rng = random.Random(1)
    for _ in range(50):
        cap = rng.choice([16, 64, 100])
        lengths = [min(cap, int(rng.paretovariate(1.2) * 3)) for _ in range(rng.randint(1, 200))]
        bins = pack(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        naive: list[int] = []  # room left per bin; best fit = the least room that holds it
        for n in sorted(lengths, reverse=True):
            fits = [k for k, room in enumerate(naive) if room >= n]
            if fits:
                naive[min(fits, key=lambda k: naive[k])] -= n
            else:
                naive.append(cap - n)
        assert sorted(cap - sum(lengths[i] for i in b) for b in bins) == sorted(naive)


def segments(micro: dict[str, torch.Tensor], r: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each example in row r of a packed micro-batch (the padding tail dropped)."""
    ids, labels = micro["input_ids"][r].tolist(), micro["labels"][r].tolist()
    starts = [i for i, p in enumerate(micro["position_ids"][r].tolist()) if p == 0] + [len(ids)]
    spans = itertools.pairwise(starts)
    return [(ids[a:b], labels[a:b]) for a, b in spans if ids[a] != 0]


def test_packing_keeps_every_example_whole(plan_for: Callable[..., GlobalBatches]) -> None:
    packed, plain = plan_for("data.packing=true"), plan_for()
    assert isinstance(packed, MapBatches) and isinstance(plain, MapBatches)

    def examples(plan: MapBatches) -> Counter[int]:
        return Counter(i for row in plan.epoch_rows(0) for i in row)

    assert examples(packed) == examples(plain)  # the same examples in the epoch, packed or not
    assert len(packed.epoch_rows(0)) < len(plain.epoch_rows(0))
    for step in range(packed.steps_in(0)):
        batch = packed.for_step(step)
        got = [segments(m, r) for m in batch.micro_batches for r in range(len(m["input_ids"]))]
        want = []
        for row in packed.global_rows(step):
            docs = [packed.store.doc(i) for i in row]
            want.append([(d["input_ids"], [-100, *d["labels"][1:]]) for d in docs])
        assert got == want  # every example whole, in its row, nothing else but padding
        micro = batch.micro_batches
        assert all(m["input_ids"].shape[1] <= 128 for m in micro)
        assert batch.global_loss_tokens == sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        real = sum(int((m["input_ids"] != 0).sum()) for m in micro)
        assert batch.global_tokens == real
        slots = sum(m["input_ids"].numel() for m in micro)
        assert batch.metrics["train/packing_efficiency"] == pytest.approx(real / slots)


@pytest.mark.parametrize(("attn", "flat"), [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_loss_equals_the_unpacked_mean(tiny_model_dir: Path, attn: str, flat: bool) -> None:
    """The masked loss of a packed batch == the token mean of each example's loss alone (fp32).

    ``flat`` (one row, what flash-attention gets) runs here through sdpa, which reads the same boundaries.
    """
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)
    model.train()  # as in training (no dropout in Llama): the KV cache default is what must not leak in
    texts = ["Why is the sky blue?", "Rain.", "Clouds form when warm air rises and cools.", "Ice floats."]
    docs = []
    for t in texts:
        ids = tok(t)["input_ids"] + [tok.eos_token_id]
        docs.append({"input_ids": ids, "labels": [-100, *ids[1:]], "length": len(ids)})
    packed = collate_packed([docs[:3], docs[3:]], tok.pad_token_id, flat=flat)
    assert packed["input_ids"].shape[0] == (1 if flat else 2)
    n_tokens = int((packed["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        got = token_loss_sum(forward_logits(model, packed), packed["labels"]) / n_tokens
        alone = [collate_padded([d], tok.pad_token_id) for d in docs]
        want = sum(token_loss_sum(forward_logits(model, m), m["labels"]) for m in alone) / n_tokens
        leaky = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))  # plain causal attention
        leaked = token_loss_sum(forward_logits(model, leaky), packed["labels"]) / n_tokens
    assert n_tokens == sum(len(d["input_ids"]) - 1 for d in docs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert abs(leaked - want) > 1e-3, "the test cannot tell cross-document attention apart"


@pytest.mark.parametrize("packing", ["false", "true"])
def test_ranks_split_each_global_batch_and_match_one_worker(
    plan_for: Callable[..., GlobalBatches], packing: str
) -> None:
    one = plan_for(f"data.packing={packing}", "train.grad_accum_steps=2")
    ranks = [plan_for(f"data.packing={packing}", "train.grad_accum_steps=1", world=2, rank=r) for r in (0, 1)]
    for step in (0, 3, 11, 40):
        whole = one.for_step(step)
        parts = [p.for_step(step) for p in ranks]
        assert [p.global_loss_tokens for p in parts] == [whole.global_loss_tokens] * 2
        for r, part in enumerate(parts):  # rank r's micro-batch is micro-batch r of 1 worker x 2 steps
            (mine,) = part.micro_batches
            assert mine.keys() == whole.micro_batches[r].keys()
            assert all(torch.equal(mine[k], whole.micro_batches[r][k]) for k in mine)
    layouts = [p.layout for p in ranks if isinstance(p, MapBatches)]
    positions = [{i for c in lay.mine() for i in range(c.start, c.stop)} for lay in layouts]
    assert positions[0].isdisjoint(positions[1]) and positions[0] | positions[1] == set(
        range(layouts[0].rows)
    )


def test_mixture_follows_the_weights_and_sees_every_example(plan_for: Callable[..., GlobalBatches]) -> None:
    plan = plan_for("train.grad_accum_steps=1", "train.micro_batch_size=1")
    assert isinstance(plan, MapBatches)
    a, b = (set(s) for s in plan.sources)
    drawn = []
    for epoch in range(5):
        rows = [i for row in plan.epoch_rows(epoch) for i in row]
        assert a | b == set(rows)  # every example at least once per epoch
        drawn += rows
    assert sum(i in a for i in drawn) / len(drawn) == pytest.approx(0.75, abs=0.05)  # weights 3 : 1
    assert plan.epoch_rows(1) != plan.epoch_rows(0)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_streaming_yields_the_map_style_batches(plan_for: Callable[..., GlobalBatches], packing: str) -> None:
    common = (f"data.packing={packing}", "data.shuffle_buffer=17")
    mapped, streamed = plan_for(*common), plan_for(*common, "data.streaming=true")
    assert isinstance(mapped, MapBatches)
    steps = mapped.steps_in(0)
    for step in [0, 1, 2, steps - 1, steps, steps + 1]:  # across the epoch boundary
        assert_same(mapped.for_step(step), streamed.for_step(step))
    for key in ("data/bad_rows", "data/bad_rows_missing_field", "data/truncated"):
        assert streamed.stats()[key] == mapped.stats()[key], key
    assert mapped.stats()["data/bad_rows"] == 2


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_resume_mid_epoch_continues_with_the_next_batch(
    plan_for: Callable[..., GlobalBatches], streaming: str
) -> None:
    overrides = ("data.packing=true", "data.shuffle_buffer=17", f"data.streaming={streaming}")
    first = plan_for(*overrides)
    reference = [first.for_step(s) for s in range(24)]  # 24 steps run into the second epoch
    for k in (3, 7, 23):
        run = plan_for(*overrides)
        for s in range(k):
            run.for_step(s)
        state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
        assert state["step"] == k
        resumed = plan_for(*overrides)
        resumed.load_state_dict(state)
        assert_same(resumed.for_step(k), reference[k])  # from the saved position
        assert_same(plan_for(*overrides).for_step(k), reference[k])  # from the step alone
    assert reference[23].epoch == 1


def test_flash_attention_gets_one_padding_free_row(plan_for: Callable[..., GlobalBatches]) -> None:
    rows = plan_for("data.packing=true")
    flat = plan_for("data.packing=true", "model.attn_implementation=flash_attention_2", "train.dtype=bf16")
    for step in (0, 5):
        a, b = rows.for_step(step), flat.for_step(step)
        assert a.global_loss_tokens == b.global_loss_tokens and a.global_tokens == b.global_tokens
        for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
            assert y["input_ids"].shape == (1, int((x["input_ids"] != 0).sum()))  # no padding at all
            keep = x["input_ids"] != 0  # the same examples, in the same order, row after row
            for k in ("input_ids", "labels", "position_ids"):
                assert torch.equal(y[k][0], x[k][keep])
        assert b.metrics["train/packing_efficiency"] == 1.0
