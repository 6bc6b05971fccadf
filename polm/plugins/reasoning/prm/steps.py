"""Solutions as steps: where the steps of a completion are, and encoding a completion for a process reward model.

A completion is scored as the policy wrote it (``<think>`` tag included), so
the PRM's backbone sees the text in the format it was fine-tuned on. Its steps
are the lines of the ``<think>`` block followed by the ``<answer>`` block, so
that an answer copied wrongly from the last line is a wrong step too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from polm.engine.encoding import IGNORE_INDEX, Encoded, encode_prompt

Span = tuple[int, int]  # (start, end) character offsets of a step in its completion

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>.*?</answer>", re.DOTALL)


@dataclass
class StepExample(Encoded):
    """An encoded solution whose ``step_index`` gives, per token, the step it belongs to (-1 for the prompt)."""

    step_index: list[int] = field(default_factory=list)


def pad_step_index(examples: Sequence[StepExample]) -> torch.Tensor:
    """(B, T) ``step_index`` of each example, right-padded with -1 like :func:`~polm.engine.encoding.pad_batch`."""
    length = max(len(example.input_ids) for example in examples)
    padded = torch.full((len(examples), length), -1, dtype=torch.long)
    for row, example in enumerate(examples):
        padded[row, : len(example.step_index)] = torch.tensor(example.step_index, dtype=torch.long)
    return padded


def _pieces(text: str, offset: int, separator: str) -> list[Span]:
    """Spans of the non-empty, whitespace-stripped pieces of ``text`` between ``separator``\\ s."""
    spans, start = [], 0
    for piece in text.split(separator):
        stripped = piece.strip()
        if stripped:
            begin = offset + start + piece.index(stripped)
            spans.append((begin, begin + len(stripped)))
        start += len(piece) + len(separator)
    return spans


def step_spans(completion: str, separator: str = "\n") -> list[Span]:
    """Where the steps of ``completion`` are.

    The steps are the pieces between ``separator``\\ s of its ``<think>`` block (of
    the text before ``<answer>`` when there is no ``<think>`` block), then its
    ``<answer>...</answer>`` block as one step when it has one.
    """
    answer = _ANSWER.search(completion)
    before = completion[: answer.start()] if answer else completion
    think = _THINK.search(before)
    spans = _pieces(think.group(1), think.start(1), separator) if think else _pieces(before, 0, separator)
    return spans + [answer.span()] if answer else spans


def split_steps(completion: str, separator: str = "\n") -> list[str]:
    """The text of each step of ``completion`` (see :func:`step_spans`)."""
    return [completion[start:end] for start, end in step_spans(completion, separator)]


def locate_steps(completion: str, steps: Sequence[str]) -> list[Span]:
    """The spans of ``steps`` found in order in ``completion``.

    Raises:
        ValueError: if a step is not in the completion after the step before it.
    """
    spans, position = [], 0
    for index, step in enumerate(steps):
        start = completion.find(step, position)
        if start < 0:
            after = f" after step {index - 1}" if index else ""
            raise ValueError(f"step {index} {step!r} is not in the completion{after}")
        spans.append((start, start + len(step)))
        position = start + len(step)
    return spans


def encode_solution(tokenizer: Any, prompt: str | list, completion: str, spans: Sequence[Span],
                    labels: Sequence[int] | None = None) -> StepExample:
    """The prompt (chat-templated) and the completion up to its last step, labelled where each step ends.

    A step's label sits on the token that holds the character after the step
    (its separator, or the ``<`` of ``</think>``), because at the step's own last
    token the model cannot tell ``= 3`` from the start of ``= 36``; the last step
    of a completion that ends there is labelled on its own last token. The text
    is tokenised in pieces cut at those characters, so a label never shares a
    token with the next step, the same way in training and in scoring.

    Args:
        spans: the steps' character spans, in order (:func:`step_spans` or :func:`locate_steps`).
        labels: one class per step (1 right, 0 wrong); without them every step end is labelled 1,
            which marks the positions to read scores at.

    Returns:
        :class:`StepExample` whose ``labels`` are ``-100`` except at step ends and whose
        ``step_index`` assigns each piece's tokens to its step.
    """
    input_ids = encode_prompt(tokenizer, prompt)
    targets = [IGNORE_INDEX] * len(input_ids)
    step_index = [-1] * len(input_ids)
    position = 0
    for index, (_, end) in enumerate(spans):
        following = spans[index + 1][0] if index + 1 < len(spans) else len(completion)
        closing = min(end + 1, following, len(completion))
        piece = tokenizer(completion[position:closing], add_special_tokens=False)["input_ids"]
        input_ids += piece
        targets += [IGNORE_INDEX] * (len(piece) - 1) + [1 if labels is None else int(labels[index])]
        step_index += [index] * len(piece)
        position = closing
    return StepExample(input_ids, targets, step_index=step_index)
