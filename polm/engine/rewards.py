"""Rewards by name: a stage's rewards checked before anything loads, called with the rows' fields, and
checks on what comes back. Every stage scores completions through :func:`score_weighted`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
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


def parse_reward_weights(spec: str | Sequence[str] | Mapping[str, float], option: str = "rewards") -> dict[str, float]:
    """``accuracy``, ``[accuracy, format]`` or ``{accuracy: 1.0, format: 0.2}`` as ``{name: weight}``.

    Raises:
        PolmError: an empty spec or a weight that is not a finite number; names are checked by the registry.
    """
    if isinstance(spec, str):
        weights = {spec: 1.0}
    elif isinstance(spec, Mapping):
        weights = dict(spec)
    else:
        weights = {name: 1.0 for name in spec}
    if not weights:
        raise PolmError(f"option '{option}' names no reward; e.g. {{accuracy: 1.0, format: 0.2}}")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise PolmError(f"option '{option}': the weight of reward '{name}' must be a number, got {weight!r}")
    return {str(name): float(weight) for name, weight in weights.items()}


def check_rewards(weights: Mapping[str, float], reward_options: Mapping[str, Any]) -> None:
    """Fail before anything loads on a reward that is not registered, or options for one ``rewards`` does not list.

    Raises:
        PolmError: naming the reward (with the registered ones) or the stray options.
    """
    from polm.engine.plugins import registry

    rewards = registry("rewards")
    for name in weights:
        rewards.get(name)
    if not all(isinstance(options, Mapping) for options in reward_options.values()):
        raise PolmError("option 'reward_options' maps reward names to option mappings, e.g. {format: {pattern: ...}}")
    stray = sorted(set(reward_options) - set(weights))
    if stray:
        raise PolmError(f"option 'reward_options' sets options of {', '.join(stray)}, which 'rewards' does not "
                        f"list ({', '.join(weights)}); add them to 'rewards' or remove their options")


def check_reward_options(weights: Mapping[str, float], reward_options: Mapping[str, Mapping[str, Any]]) -> None:
    """Ask each reward of ``weights`` that carries a ``check_options`` attribute whether its options hold (a
    reward model's folder exists), before a stage writes anything.

    Raises:
        PolmError: what the reward found, naming the reward.
    """
    from polm.engine.plugins import registry

    rewards = registry("rewards")
    for name in weights:
        check = getattr(rewards.get(name), "check_options", None)
        if check is not None:
            try:
                check(**reward_options.get(name, {}))
            except (PolmError, TypeError) as error:  # TypeError: an option the reward does not take
                raise PolmError(f"reward '{name}': {error}") from None


def score_weighted(weights: Mapping[str, float], rows: Sequence[Row], completions: Sequence[str],
                   reward_options: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of several registered rewards, and each reward's own values.

    Args:
        weights: ``{reward name: weight}`` (see :func:`parse_reward_weights`).
        rows: one row per completion (its fields reach the rewards as keyword lists).
        reward_options: keyword arguments per reward name, e.g. ``{format: {pattern: ...}}``.

    Returns:
        ``(total, per_reward)``: N weighted sums, and ``{name: N values}`` before weighting.
    """
    from polm.engine.plugins import registry

    rewards = registry("rewards")
    per_reward: dict[str, list[float]] = {}
    for name in weights:
        function = rewards.get(name)
        options = dict((reward_options or {}).get(name, {}))
        per_reward[name] = score(name, partial(function, **options) if options else function, rows, completions)
    total = [sum(weights[name] * per_reward[name][i] for name in weights) for i in range(len(completions))]
    return total, per_reward
