"""Built-in rewards on verifiable answers."""

from __future__ import annotations

from typing import Any

from polm.engine.answers import answers_match


def accuracy_reward(prompts: list[Any], completions: list[str], answer: list[str], tolerance: float = 0.0,
                    **fields: Any) -> list[float]:
    """1.0 for each completion whose final answer matches ``answer``, else 0.0.

    The final answer is taken from ``<answer>...</answer>`` or ``\\boxed{...}``
    when present, else the whole completion; numbers compare within ``tolerance``.
    """
    return [float(answers_match(completion, expected, tolerance)) for completion, expected in zip(completions, answer)]
