"""The two local corpora and the pre-trained base of the preconditioner usefulness benchmark.

Pre-training corpus: every docstring of the Python standard library on this machine (modules, classes,
functions; collected with ``ast`` in sorted file order, tests left out). Fine-tuning corpus: the long
descriptions (README texts) in the METADATA files of the packages installed beside this code, split by
package into train and eval with a fixed seed. Both are deterministic for a given machine; their
fingerprints go into the results. The base (tokenizer + a ~4.7M-parameter Llama pre-trained briefly on
the docstrings) is built once by ``trainer.model.tiny`` and cached under ``.cache/bench/``.
"""

from __future__ import annotations

import ast
import email
import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from trainer.config import TinyModelSpec
from trainer.model import ensure_tiny_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class BaseShape:
    """The tiny Llama and its brief pre-training (the defaults give 4.72M parameters)."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 4096
    pretrain_steps: int = 300
    seed: int = 0


@dataclass
class FineTuneData:
    """Token blocks of the fine-tuning corpus: ``train`` (n, block) and ``eval`` (m, block)."""

    train: torch.Tensor
    eval: torch.Tensor
    fingerprint: dict[str, object]


def stdlib_docstrings() -> list[str]:
    """Every docstring of the standard library's .py files (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately broken (test data, Python 2 leftovers)
        texts += [
            doc for node in ast.walk(tree) if isinstance(node, DOC_NODES) if (doc := ast.get_docstring(node))
        ]
    return texts


def package_readmes() -> dict[str, str]:
    """{distribution: long description} from every METADATA beside this interpreter's packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = {}
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        msg = email.message_from_string(meta.read_text(encoding="utf-8", errors="replace"))
        body = msg.get_payload()
        text = (body if isinstance(body, str) and body.strip() else msg.get("Description", "")).strip()
        if len(text) >= 200:  # a line or two of boilerplate is no README
            out[meta.parent.name.removesuffix(".dist-info")] = text
    return out


def _sha(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def ensure_base(shape: BaseShape) -> Path:
    """The pre-trained base's directory, built on first use.

    The key covers the shape and the interpreter (its version and stdlib path fix the corpus), so a rerun
    skips the 20 s of parsing as well as the pre-training.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(json.dumps([shape.__dict__, sys.version, stdlib]).encode()).hexdigest()[:12]
    path = CACHE / f"usefulness-base-{key}"
    corpus = CACHE / f"stdlib-docstrings-{key}.jsonl"
    if not (path / "config.json").is_file():
        texts = stdlib_docstrings()
        CACHE.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        spec = TinyModelSpec(
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_heads,
            vocab_size=shape.vocab_size,
            tokenizer_corpus=[str(corpus)],
            seed=shape.seed,
            pretrain_steps=shape.pretrain_steps,
        )
        ensure_tiny_model(str(path), spec)
        (path / "corpus.json").write_text(json.dumps({"docstrings": len(texts), "sha256_16": _sha(texts)}))
    return path


def _blocks(tokenizer: PreTrainedTokenizerBase, texts: list[str], block: int) -> torch.Tensor:
    ids = tokenizer(texts)["input_ids"]
    stream = torch.tensor([t for seq in ids for t in (*seq, tokenizer.eos_token_id)])
    return stream[: len(stream) // block * block].view(-1, block)


def fine_tune_data(
    tokenizer: PreTrainedTokenizerBase, block: int, eval_fraction: float, eval_blocks: int, seed: int
) -> FineTuneData:
    """README blocks, split by package (seeded); ``eval_blocks`` evenly spaced eval blocks are kept."""
    readmes = package_readmes()
    names = sorted(readmes)
    random.Random(seed).shuffle(names)
    n_eval = max(1, round(eval_fraction * len(names)))
    eval_names, train_names = sorted(names[:n_eval]), sorted(names[n_eval:])
    train = _blocks(tokenizer, [readmes[n] for n in train_names], block)
    held = _blocks(tokenizer, [readmes[n] for n in eval_names], block)
    keep = torch.linspace(0, len(held) - 1, min(eval_blocks, len(held))).round().long()
    fingerprint = {
        "packages_train": len(train_names),
        "packages_eval": len(eval_names),
        "eval_packages": eval_names,
        "train_tokens": train.numel(),
        "eval_tokens_available": held.numel(),
        "sha256_16": _sha([readmes[n] for n in sorted(readmes)]),
    }
    return FineTuneData(train=train, eval=held[keep], fingerprint=fingerprint)
