"""Turning rows into token ids and loss masks for causal language models.

Prompts go through the tokenizer's chat template when it has one, so that
training and evaluation see the same text the model will be asked with.
Labels are ``-100`` wherever no loss is taken: the prompt, the user and
system turns of a chat, and padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from polm.engine.data import Row, row_format
from polm.engine.errors import PolmError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One training example: ``input_ids`` and ``labels`` of equal length."""

    input_ids: list[int]
    labels: list[int]


def as_messages(prompt: str | list[Row]) -> list[Row]:
    """A prompt as a chat: a string becomes one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _text_only(messages: list[Row]) -> list[Row]:
    for message in messages:
        if isinstance(message["content"], list):
            kinds = sorted({part["type"] for part in message["content"]} - {"text"})
            if kinds:
                raise PolmError(
                    f"a message holds {', '.join(kinds)} content, which a text-only model cannot read; "
                    "use a multimodal model with encoders for those modalities"
                )
    return [
        {**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
        for m in messages
    ]


def render_chat(tokenizer: Any, messages: list[Row], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise PolmError(
            f"tokenizer '{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}' has no chat template, "
            "so chat rows cannot be rendered; set tokenizer.chat_template or use {prompt, completion} rows"
        )
    text = tokenizer.apply_chat_template(
        _text_only(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: Any, prompt: str | list[Row]) -> list[int]:
    """The token ids a model is given to answer ``prompt``."""
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, as_messages(prompt), add_generation_prompt=True)
    if not isinstance(prompt, str):
        render_chat(tokenizer, prompt, add_generation_prompt=True)  # raises the no-template error
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer: Any, prompt: str | list[Row], completion: str) -> Encoded:
    """Prompt and completion with the loss on the completion tokens only."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt) + [{"role": "assistant", "content": completion}]
        full_ids = render_chat(tokenizer, messages, add_generation_prompt=False)
        _check_prefix(prompt_ids, full_ids, tokenizer)
        completion_ids = full_ids[len(prompt_ids):]
    else:
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def encode_chat(tokenizer: Any, messages: list[Row]) -> Encoded:
    """A multi-turn chat with the loss on the assistant turns only."""
    input_ids: list[int] = []
    labels: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True) if index else []
        through = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        _check_prefix(input_ids, before, tokenizer)
        _check_prefix(before, through, tokenizer)
        labels += [IGNORE_INDEX] * (len(before) - len(input_ids)) + through[len(before):]
        input_ids = through
    if not input_ids:
        raise PolmError("a chat row has no assistant message to learn from")
    return Encoded(input_ids, labels)


def _check_prefix(prefix: list[int], full: list[int], tokenizer: Any) -> None:
    if full[: len(prefix)] != prefix:
        raise PolmError(
            f"the chat template of '{getattr(tokenizer, 'name_or_path', '')}' renders a conversation "
            "differently from its beginning, so prompt tokens cannot be masked; use a prefix-consistent template"
        )


def encode_row(tokenizer: Any, row: Row) -> Encoded:
    """Encode a row for supervised training, whatever its format."""
    fmt = row_format(row)
    if fmt == "text":
        ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        return Encoded(ids, list(ids))
    if fmt == "chat":
        return encode_chat(tokenizer, row["messages"])
    if fmt == "completion":
        return encode_completion(tokenizer, row["prompt"], row["completion"])
    if fmt == "task":
        return encode_completion(tokenizer, row["prompt"], row["answer"])
    if fmt == "preference":
        return encode_completion(tokenizer, row["prompt"], row["chosen"])
    raise PolmError(f"cannot train on a row with fields {sorted(row)}")


def truncate(example: Encoded, max_length: int) -> Encoded | None:
    """Cut to ``max_length`` tokens; None if no labelled token survives."""
    labels = example.labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(example.input_ids[:max_length], labels)


def pad_batch(examples: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels`` (B, T)
        with ``-100`` on padding.
    """
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
