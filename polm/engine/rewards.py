"""Calling reward functions: fields from the rows, checks on what comes back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from polm.engine.data import Row
from polm.engine.errors import PolmError

PROMPT_FIELDS = ("prompt", "messages")


def reward_fields(rows: Sequence[Row]) -> dict[str, list[Any]]:
    """The rows' other columns (``answer``, ``level``, ...) as lists, one entry per row."""
    keys = sorted({key for row in rows for key in row if key not in PROMPT_FIELDS})
    return {key: [row.get(key) for row in rows] for key in keys}


def score(name: str, reward: Any, rows: Sequence[Row], completions: Sequence[str]) -> list[float]:
    """``reward(prompts, completions, **fields)`` with one completion per row.

    Raises:
        PolmError: if the reward raises, returns the wrong number of values, or
            a value that is not a finite number; the message names the reward and the sample.
    """
    prompts = [row.get("prompt") for row in rows]
    try:
        values = list(reward(prompts, list(completions), **reward_fields(rows)))
    except Exception as error:
        raise PolmError(f"reward '{name}' raised {type(error).__name__}: {error} "
                        f"(first sample: prompt={prompts[0]!r}, completion={completions[0]!r})") from error
    if len(values) != len(completions):
        raise PolmError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions "
                        f"(first sample: prompt={prompts[0]!r}, completion={completions[0]!r})")
    for index, value in enumerate(values):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PolmError(f"reward '{name}' returned {value!r} for sample {index} "
                            f"(prompt={prompts[index]!r}, completion={completions[index]!r}); expected a finite number")
    return [float(value) for value in values]
