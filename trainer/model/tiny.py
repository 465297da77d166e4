"""The embedded default base model: a tiny Llama built locally, so nothing is downloaded.

A byte-level BPE tokenizer is trained on local text, a random-init Llama of the given shape is created
with a fixed seed (optionally trained briefly on the same text so it is not pure noise), and both are
saved with ``save_pretrained``. From then on the directory loads like any real model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trainer.checkpoints import atomic_dir, file_lock
from trainer.config import ConfigError, TinyModelSpec

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]


def corpus_texts(paths: list[str]) -> Iterator[str]:
    """Every string value of every jsonl row (or every line of a text file)."""
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                yield from (v for v in json.loads(line).values() if isinstance(v, str))
            else:
                yield line


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def pretrain(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int
) -> None:
    """A few full-parameter steps of next-token prediction on ``texts`` (batch 16, length 128)."""
    ids = [tokenizer(t + tokenizer.eos_token)["input_ids"] for t in texts]
    stream = torch.tensor([i for seq in ids for i in seq])
    block = 128
    blocks = stream[: len(stream) // block * block].view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    log.info("pre-trained the tiny base for %d steps (final loss %.3f)", steps, loss.item())


BUILD_RECORD = "spec.json"


class StaleModelError(ConfigError):
    """``model.path`` holds a model that was not built from this ``model.build``."""


def _builder_digest() -> str:
    """sha256 of the code that turns a spec into weights: a model built by an older version of it is
    stale too (the golden losses must not pass on one)."""
    code = "".join(inspect.getsource(f) for f in (corpus_texts, train_tokenizer, build_tiny_model, pretrain))
    return hashlib.sha256(code.encode()).hexdigest()


def build_record(spec: TinyModelSpec) -> dict[str, Any]:
    """What a tiny model is built from: the spec, the contents of its corpus (its paths differ from one
    checkout to the next and do not matter; what they hold does) and the builder's code."""
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in spec.tokenizer_corpus]
    return {
        **spec.model_dump(mode="json"),
        "tokenizer_corpus_sha256": digests,
        "builder_sha256": _builder_digest(),
    }


def check_built_from(target: Path, spec: TinyModelSpec) -> None:
    """Refuse a model at ``target`` that ``spec`` did not build, naming what differs.

    Refused rather than rebuilt: a rebuild would silently put another base under the checkpoints and
    adapters trained on this one (a resume, a merge), and runs from other checkouts that share the cache
    and still ask for the old spec would rebuild it back in turn. Deleting the directory is one command.
    A model built before the record held the digests (its spec.json is the spec alone) is checked on the
    spec and used with a warning: its corpus and builder cannot be verified.
    """
    fix = f"delete {target} to rebuild it, or set model.path to another directory"
    record = target / BUILD_RECORD
    if not record.is_file():
        raise StaleModelError(
            f"model.path: {target} holds a model that model.build did not build (it has no {BUILD_RECORD}); "
            f"remove model.build to train on it as it is, or {fix}"
        )
    saved, wanted = json.loads(record.read_text()), build_record(spec)
    digests = {"tokenizer_corpus_sha256": "tokenizer_corpus: the files' contents",
               "builder_sha256": "trainer/model/tiny.py: the code that builds it"}  # fmt: skip
    legacy = not any(key in saved for key in digests)
    diffs = []
    for key, want in wanted.items():
        if key == "tokenizer_corpus" or saved.get(key) == want or (legacy and key in digests):
            continue
        if key in digests:
            diffs.append(
                f"{digests[key]} {'differed' if key in saved else 'went unrecorded'} when it was built"
            )
        else:
            diffs.append(f"{key}: built with {saved.get(key)!r}, model.build asks for {want!r}")
    if diffs:
        raise StaleModelError(
            f"model.path: {target} was built from another model.build ({'; '.join(diffs)}); {fix}"
        )
    if legacy:
        log.warning(
            "%s was built before its %s recorded the corpus and builder digests: only its spec could be "
            "checked (it matches); %s if its corpus or trainer/model/tiny.py changed since", target,
            BUILD_RECORD, fix,
        )  # fmt: skip


def ensure_tiny_model(path: str, spec: TinyModelSpec) -> bool:
    """Build the tiny model at ``path`` unless it is already there; returns whether it was built.

    A model already there must have been built from ``spec`` (and the same corpus contents), else
    ``StaleModelError``. Safe against concurrent callers (a file lock) and crashes (written to a
    temporary dir, renamed).
    """
    target = Path(path)
    if (target / "config.json").is_file():
        check_built_from(target, spec)
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():
            check_built_from(target, spec)
            return False
        log.info("building the tiny base model at %s", target)
        texts = list(corpus_texts(spec.tokenizer_corpus))
        tokenizer = train_tokenizer(texts, spec.vocab_size)
        model = build_tiny_model(spec, tokenizer)
        if spec.pretrain_steps:
            pretrain(model, tokenizer, texts, spec.pretrain_steps)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / BUILD_RECORD).write_text(json.dumps(build_record(spec), indent=2) + os.linesep)
    return True
