"""Rows to tokens: the text, instruction and chat formats, and which tokens carry loss.

A row is rendered into segments of text, each marked as carrying loss or not, and every segment is
tokenised on its own. That is how the model meets the text at inference: the prompt (or the conversation
so far, with the generation prompt) is tokenised, and the answer's tokens follow it. A token of a
loss-carrying segment is its own label; any other token is labelled ``IGNORE_INDEX``.

- text: the text field, with the tokenizer's special tokens (BOS), then EOS; every token carries loss.
- instruction: ``prompt_template`` (``input_template`` when the row has a non-empty input) with BOS, the
  response, then EOS; only the response and EOS carry loss unless ``train_on_prompt``.
- chat: the messages rendered with the chat template (``data.chat_template``, else the tokenizer's,
  else ``DEFAULT_CHAT_TEMPLATE``); the template writes every special token itself. An assistant turn
  is the text between the conversation before it rendered with the generation prompt and the
  conversation up to it rendered without; only those spans carry loss unless ``train_on_prompt``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from trainer.config import DataConfig

IGNORE_INDEX = -100
JSON_COLUMN = "__json__"  # json and jsonl sources keep each row's JSON text, decoded (and checked) here

# Used when neither the config nor the tokenizer has a chat template. It renders
#   <bos><|system|>\nYou are terse.\n<|user|>\nHi\n<|assistant|>\nHello!<eos>\n
# and the generation prompt is "<|assistant|>\n"; an assistant turn is its content, EOS and newline.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

Segment = tuple[str, bool, bool]  # text, carries loss, tokenised with the tokenizer's special tokens
Encoded = dict[str, list[Any]]  # columns input_ids, labels, n_loss, length, bad, truncated (one per row)


class BadRowError(ValueError):
    """A row that cannot be used; ``kind`` is the count's name (missing_field, wrong_type, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _string(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):  # csv's empty cell is NaN
        raise BadRowError("missing_field", f"field {name!r} is missing")
    if not isinstance(value, str):
        raise BadRowError("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    if not value:
        raise BadRowError("empty_field", f"field {name!r} is empty")
    return value


def decode(row: dict[str, Any]) -> dict[str, Any] | None:
    """The row's fields; None for a blank line of a jsonl file (not a row)."""
    if JSON_COLUMN not in row:
        return row
    text = row[JSON_COLUMN]
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRowError("invalid_json", f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRowError("wrong_type", f"a row must be a JSON object, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], name: str) -> list[dict[str, str]]:
    messages = row.get(name)
    if messages is None:
        raise BadRowError("missing_field", f"field {name!r} is missing")
    if not isinstance(messages, list):
        raise BadRowError(
            "wrong_type", f"field {name!r} must be a list of messages, got {type(messages).__name__}"
        )
    if not messages:
        raise BadRowError("empty_messages", f"field {name!r} has no messages")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadRowError(
                "wrong_type", f"{name}[{i}] must be an object with string role and content, got {m!r}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str | None, train_all: bool
) -> list[Segment]:
    """The rendered conversation cut at the assistant turns (see the module docstring)."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja raises its own types, and templates raise on purpose
            raise BadRowError("template", f"the chat template failed: {e}") from None
        return str(text)

    full = render(messages, False)
    segments: list[Segment] = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= pos):
            raise BadRowError(
                "template", "the chat template does not render a conversation's start as a prefix"
            )
        segments += [(full[pos : len(before)], train_all, False), (through[len(before) :], True, False)]
        pos = len(through)
    segments.append((full[pos:], train_all, False))
    return [s for s in segments if s[0]]


def row_segments(
    row: dict[str, Any], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str | None
) -> tuple[list[Segment], bool]:
    """The segments of one decoded row, and whether EOS follows them."""
    if cfg.format == "text":
        return [(_string(row, cfg.text_field), True, True)], True
    if cfg.format == "chat":
        return chat_segments(
            _messages(row, cfg.messages_field), tokenizer, template, cfg.train_on_prompt
        ), False
    rendered = instruction_prompt(_string(row, cfg.prompt_field), row.get(cfg.input_field), cfg)
    return [(rendered, cfg.train_on_prompt, True), (_string(row, cfg.response_field), True, False)], True


def instruction_prompt(prompt: str, extra: Any, cfg: DataConfig) -> str:
    """An instruction row's prompt text: ``input_template`` when it has a non-empty input."""
    if isinstance(extra, str) and extra:
        return cfg.input_template.format(prompt=prompt, input=extra)
    return cfg.prompt_template.format(prompt=prompt)


def prompt_ids(prompt: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids a model trained on ``cfg``'s format meets before its answer, for ``prompt``.

    The same rendering as training's: text is tokenised as is (with BOS); an instruction goes through
    the prompt template (with BOS); a chat prompt is one user turn rendered with the generation prompt.
    """
    if cfg.format == "chat":
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(
            messages, chat_template=chat_template(cfg, tokenizer), tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    text = prompt if cfg.format == "text" else instruction_prompt(prompt, None, cfg)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def prompt_and_reference(
    row: dict[str, Any], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], str]:
    """An instruction or chat row as a generation task: the prompt's ids and the expected answer (the
    response, or the conversation's last assistant turn). Raises BadRowError for what cannot be one."""
    if cfg.format == "instruction":
        rendered = instruction_prompt(_string(row, cfg.prompt_field), row.get(cfg.input_field), cfg)
        return list(tokenizer(rendered, add_special_tokens=True)["input_ids"]), _string(
            row, cfg.response_field
        )
    if cfg.format == "chat":
        messages = _messages(row, cfg.messages_field)
        if not messages or messages[-1]["role"] != "assistant":
            raise BadRowError("no_answer", "the conversation does not end with an assistant turn")
        text = tokenizer.apply_chat_template(
            messages[:-1], chat_template=chat_template(cfg, tokenizer), tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"]), messages[-1]["content"]
    raise BadRowError("format", "text rows have no prompt and answer: exact match needs instruction or chat")


def chat_template(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The template chat rows are rendered with (None: the tokenizer's own)."""
    if cfg.chat_template:
        return cfg.chat_template
    return None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE


def _tokenize_all(segments: list[Segment], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of every segment, in two batched calls (with and without special tokens)."""
    out: list[list[int]] = [[] for _ in segments]
    for special in (True, False):
        picked = [i for i, s in enumerate(segments) if s[2] == special]
        if picked:
            ids = tokenizer([segments[i][0] for i in picked], add_special_tokens=special)["input_ids"]
            for i, seq in zip(picked, ids, strict=True):
                out[i] = list(seq)
    return out


def _append(
    out: Encoded, ids: list[int], labels: list[int], n_loss: int, bad: str, cut: bool = False
) -> None:
    for key, value in zip(out, (ids, labels, n_loss, len(ids), bad, cut), strict=True):
        out[key].append(value)


def _finish(ids: list[int], labels: list[int], cfg: DataConfig, out: Encoded) -> None:
    """Truncate or reject an over-long example, count its loss tokens, and append it to ``out``.

    A truncated example stays even if no loss token is left (it is counted as truncated, not bad);
    an untruncated one without any (a conversation with no assistant turn) is a bad row.
    """
    bad, cut = "", len(ids) > cfg.max_seq_len
    if cut and cfg.truncate:
        ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    elif cut:
        bad = f"too_long\t{len(ids)} tokens, more than data.max_seq_len={cfg.max_seq_len} (data.truncate)"
    # Tokens that carry loss after the one-position shift of next-token prediction.
    n_loss = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    if not bad and not cut and n_loss == 0:
        bad = "no_loss\tno token carries loss (no response or assistant turn)"
    if bad:
        ids, labels, n_loss = [], [], 0
    _append(out, ids, labels, n_loss, bad, cut and not bad)


def make_encoder(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> Callable[[dict[str, list[Any]]], Encoded]:
    """A batched encoder (datasets' ``map(batched=True)`` shape): columns of rows in, Encoded out.

    A bad row comes out with length 0 and ``bad`` = "kind<TAB>message"; a blank line with length 0 and
    ``bad`` empty. Nothing is raised here, so the caller decides (error naming the row, or skip and count).
    """
    template = chat_template(cfg, tokenizer) if cfg.format == "chat" else None
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[Any]]) -> Encoded:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        rendered: list[tuple[list[Segment], bool] | str] = []
        for raw in rows:
            try:
                row = decode(raw)
                rendered.append(row_segments(row, cfg, tokenizer, template) if row is not None else "")
            except BadRowError as e:
                rendered.append(f"{e.kind}\t{e}")
        flat = [s for r in rendered if not isinstance(r, str) for s in r[0]]
        tokens = iter(_tokenize_all(flat, tokenizer))
        out: Encoded = {"input_ids": [], "labels": [], "n_loss": [], "length": [], "bad": [], "truncated": []}
        for r in rendered:
            if isinstance(r, str):  # a bad row, or "" for a blank line
                _append(out, [], [], 0, r)
                continue
            ids, labels = [], []
            for _text, carries_loss, _special in r[0]:
                seq = next(tokens)
                ids += seq
                labels += seq if carries_loss else [IGNORE_INDEX] * len(seq)
            if r[1]:
                ids, labels = [*ids, eos], [*labels, eos]
            _finish(ids, labels, cfg, out)
        return out

    return encode
