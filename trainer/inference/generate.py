"""Generation from a trained run: the prompt rendered as the run's data was, tokens streamed as they come."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from trainer.data.formats import prompt_ids
from trainer.inference.trained import InferenceError, TrainedModel


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    """Most tokens generated after the prompt (fewer when the model ends its answer with EOS)."""
    temperature: float = 0.0
    """0: greedy decoding (deterministic); > 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling's probability mass (with temperature > 0)."""
    seed: int = 0
    """Seed of the sampler (with temperature > 0)."""


class _WriteStreamer(TextStreamer):
    """transformers' TextStreamer (whole words, prompt skipped), writing to ``out`` instead of print."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def context_length(model: Any) -> int | None:
    """The most positions the model was built for (None when its config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_fits(n_prompt: int, max_new_tokens: int, model: Any) -> None:
    limit = context_length(model)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise InferenceError(
            f"the prompt is {n_prompt} tokens and --max-new-tokens is {max_new_tokens}: {n_prompt} + "
            f"{max_new_tokens} = {n_prompt + max_new_tokens} exceeds the model's context of {limit} tokens"
        )


@torch.no_grad()
def generate_ids(
    trained: TrainedModel, ids: list[int], settings: GenerationSettings, out: TextIO | None = None
) -> list[int]:
    """The new token ids after ``ids`` (EOS excluded), streamed to ``out`` as text when given."""
    check_fits(len(ids), settings.max_new_tokens, trained.model)
    tok, model = trained.tokenizer, trained.model
    model_any: Any = model  # PreTrainedModel.generate, which its stubs type as a tensor attribute
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sample = settings.temperature > 0
    if sample:
        torch.manual_seed(settings.seed)
    output = model_any.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        streamer=_WriteStreamer(tok, out) if out is not None else None,
    )
    new = output[0, len(ids) :].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def generate(
    trained: TrainedModel, prompt: str, settings: GenerationSettings, out: TextIO | None = None
) -> str:
    """The model's answer to ``prompt``, rendered with the run's own template."""
    new = generate_ids(trained, prompt_ids(prompt, trained.data, trained.tokenizer), settings, out)
    return str(trained.tokenizer.decode(new, skip_special_tokens=True))


def read_prompts(path: Path, prompt_field: str) -> list[str]:
    """Prompts of a jsonl file: each line an object with ``prompt`` (or the run's prompt field)."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(f"{path}: line {number}: not valid JSON: {e}") from None
        value = row.get("prompt", row.get(prompt_field)) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value:
            raise InferenceError(
                f"{path}: line {number}: needs a non-empty string field 'prompt' (or {prompt_field!r})"
            )
        prompts.append(value)
    if not prompts:
        raise InferenceError(f"{path}: holds no prompts")
    return prompts


@torch.no_grad()
def greedy_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, synced: bool = False
) -> list[list[int]]:
    """Greedy answers (new ids, EOS excluded) to ``prompts``, decoded together, left-padded.

    ``synced``: every rank of a ZeRO-3 engine calls this with the same prompts and keeps running forward
    passes until all ranks are done (transformers' ``synced_gpus``): each forward gathers the
    partitioned parameters collectively, so no rank may stop first.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    output = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced,
    )  # fmt: skip
    answers = []
    for row in output[:, width:].tolist():
        answers.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return answers
