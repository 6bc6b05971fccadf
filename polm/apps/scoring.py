"""The Rewards tab: score typed completions of one prompt with registered rewards.

Rewards are read from the registry on every request, so rewards that a
plugin registers while the app runs can be chosen without a restart.
"""

from __future__ import annotations

import json
from typing import Any

from polm.engine.errors import PolmError
from polm.engine.rewards import PROMPT_FIELDS, score_weighted

#: A line holding only this separates completions (completions may span several lines).
COMPLETION_SEPARATOR = "---"


def available_rewards() -> list[tuple[str, str, str]]:
    """``(name, plugin, description)`` of every registered reward, in registration order."""
    from polm.engine.plugins import registry

    return [(entry.name, entry.plugin, entry.metadata.get("description", ""))
            for entry in registry("rewards").entries()]


def split_completions(text: str) -> list[str]:
    """Completions separated by lines that hold only ``---``; surrounding blank lines are dropped.

    Raises:
        PolmError: no completion was given.
    """
    blocks: list[list[str]] = [[]]
    for line in (text or "").splitlines():
        if line.strip() == COMPLETION_SEPARATOR:
            blocks.append([])
        else:
            blocks[-1].append(line)
    completions = ["\n".join(block).strip() for block in blocks]
    completions = [completion for completion in completions if completion]
    if not completions:
        raise PolmError(f"enter at least one completion (separate several with a line holding only "
                        f"'{COMPLETION_SEPARATOR}')")
    return completions


def parse_object(text: str, what: str) -> dict[str, Any]:
    """A JSON object typed by the user; empty text is an empty object.

    Raises:
        PolmError: the text is not JSON, or not an object.
    """
    if not (text or "").strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PolmError(f"{what}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(value, dict):
        raise PolmError(f"{what}: expected a JSON object such as {{\"answer\": \"19\"}}, got {type(value).__name__}")
    return value


def score_completions(prompt: str, completions: str, rewards: list[str], fields: str = "",
                      reward_options: str = "") -> tuple[list[str], list[list[Any]]]:
    """Score each completion of ``prompt`` with each chosen reward.

    Args:
        prompt: the prompt the completions answer.
        completions: completions separated by ``---`` lines (see :func:`split_completions`).
        rewards: registered reward names.
        fields: a JSON object of the row's other fields (for example ``{"answer": "19"}``),
            given to every reward for every completion.
        reward_options: a JSON object of keyword arguments per reward, e.g. ``{"accuracy": {"tolerance": 0.5}}``.

    Returns:
        ``(headers, rows)``: ``completion`` and one column per reward; one row per completion.

    Raises:
        PolmError: no reward chosen, an unknown reward, malformed input, or a reward that fails.
    """
    if not rewards:
        raise PolmError("choose at least one reward")
    texts = split_completions(completions)
    row_fields = parse_object(fields, "fields")
    taken = [name for name in PROMPT_FIELDS if name in row_fields]
    if taken:
        raise PolmError(f"fields: '{taken[0]}' is the prompt, which has its own box; remove it from the fields")
    options = parse_object(reward_options, "reward options")
    for name, value in options.items():
        if name not in rewards:
            raise PolmError(f"reward options: '{name}' is not one of the chosen rewards ({', '.join(rewards)})")
        if not isinstance(value, dict):
            raise PolmError(f"reward options: the options of '{name}' must be an object, got {value!r}")
    rows = [{"prompt": prompt, **row_fields} for _ in texts]
    _, per_reward = score_weighted({name: 1.0 for name in rewards}, rows, texts, options)
    return ["completion", *rewards], [[text, *(per_reward[name][i] for name in rewards)]
                                      for i, text in enumerate(texts)]
