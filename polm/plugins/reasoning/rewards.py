"""Built-in rewards on verifiable answers and on the shape of a completion.

Each is a plain callable ``(prompts, completions, **fields) -> list[float]``;
keyword options (``pattern``, ``target``, ``n``...) come from a recipe's
``reward_options: {<reward>: {...}}``.
"""

from __future__ import annotations

import re
from typing import Any

from polm.engine.answers import answers_match

THINK_ANSWER_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


def accuracy_reward(prompts: list[Any], completions: list[str], answer: list[str], tolerance: float = 0.0,
                    **fields: Any) -> list[float]:
    """1.0 for each completion whose final answer matches ``answer``, else 0.0.

    The final answer is taken from ``<answer>...</answer>`` or ``\\boxed{...}``
    when present, else the whole completion; numbers compare within ``tolerance``.
    """
    return [float(answers_match(completion, expected, tolerance)) for completion, expected in zip(completions, answer)]


def format_reward(prompts: list[Any], completions: list[str], pattern: str = THINK_ANSWER_PATTERN,
                  **fields: Any) -> list[float]:
    """1.0 for each completion that, stripped, matches ``pattern`` entirely (``.`` matches newlines), else 0.0.

    The default asks for ``<think>...</think><answer>...</answer>``; a task answered
    with a bare number sets e.g. ``pattern: '-?\\d+'``.
    """
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(completion.strip()) is not None) for completion in completions]


def length_reward(prompts: list[Any], completions: list[str], target: int | None = None, max_chars: int = 1000,
                  **fields: Any) -> list[float]:
    """A length penalty in [-1, 0], counted in characters.

    Without ``target``: ``-min(len, max_chars) / max_chars`` (shorter is better).
    With ``target``: ``-min(|len - target| / target, 1)`` (closer to ``target`` is better).
    """
    if target is not None and target < 1:
        raise ValueError(f"target must be a positive number of characters, got {target}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if target is None:
        return [-min(len(completion), max_chars) / max_chars for completion in completions]
    return [-min(abs(len(completion) - target) / target, 1.0) for completion in completions]


def repetition_reward(prompts: list[Any], completions: list[str], n: int = 3, unit: str = "words",
                      **fields: Any) -> list[float]:
    """An n-gram repetition penalty in [-1, 0]: minus the share of a completion's n-grams that repeat an earlier one.

    ``-(1 - distinct n-grams / n-grams)``; 0 for completions shorter than ``n`` units.
    ``unit`` is ``words`` (split on whitespace) or ``chars``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if unit not in ("words", "chars"):
        raise ValueError(f"unit must be 'words' or 'chars', got {unit!r}")
    values = []
    for completion in completions:
        units = completion.split() if unit == "words" else list(completion)
        grams = [tuple(units[i: i + n]) for i in range(len(units) - n + 1)]
        values.append(-(1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return values
