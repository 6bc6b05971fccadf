"""Solutions as steps: splitting a completion into steps, and encoding steps for a process reward model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from polm.engine.encoding import IGNORE_INDEX, Encoded, encode_prompt

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"</?answer>")


def split_steps(completion: str, separator: str = "\n") -> list[str]:
    """The steps of ``completion``: the non-empty pieces between ``separator``\\ s of its ``<think>`` block,
    else of the whole completion with ``<answer>`` tags removed."""
    found = _THINK.search(completion)
    text = found.group(1) if found else _ANSWER.sub("", completion)
    return [step.strip() for step in text.split(separator) if step.strip()]


def encode_steps(tokenizer: Any, prompt: str | list, steps: Sequence[str], labels: Sequence[int] | None = None,
                 separator: str = "\n") -> Encoded:
    """The prompt (chat-templated) followed by each step and ``separator``, labelled on each step's last token.

    Steps are tokenised one by one so that a step ends on a token boundary,
    the same way in training and in scoring.

    Args:
        labels: one class per step (1 right, 0 wrong); without them every step-end is labelled 1,
            which marks the positions to read scores at.

    Returns:
        :class:`~polm.engine.encoding.Encoded` whose ``labels`` are ``-100`` except at step ends.
    """
    input_ids = encode_prompt(tokenizer, prompt)
    targets = [IGNORE_INDEX] * len(input_ids)
    for index, step in enumerate(steps):
        piece = tokenizer(step + separator, add_special_tokens=False)["input_ids"]
        input_ids += piece
        targets += [IGNORE_INDEX] * (len(piece) - 1) + [1 if labels is None else int(labels[index])]
    return Encoded(input_ids, targets)
