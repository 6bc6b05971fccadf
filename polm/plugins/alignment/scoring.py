"""Where on-policy alignment stages (``ppo``, ``online_dpo``) get their rewards.

A stage names a trained reward model (``reward_model: <folder>``), registered
reward functions with weights (``rewards: {accuracy: 1.0, judge: 0.5}``), or
both; ``reward_model: path`` is shorthand for the reward ``reward_model`` with
weight 1 and ``reward_options: {reward_model: {path: ...}}``. Every reward is
called through :func:`polm.engine.rewards.score_weighted`, so a completion's
reward is the weighted sum of the named rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from polm.engine.data import Row
from polm.engine.evaluation import generate
from polm.engine.rewards import parse_reward_weights, score_weighted

REWARD_MODEL = "reward_model"


@dataclass
class RewardOptions:
    """The reward options of on-policy stages (mixed into their options dataclass)."""

    reward_model: str | None = field(default=None, metadata={
        "help": "a trained reward model: a reward_model stage's folder (e.g. runs/demo/01-reward_model) or its final/"})
    rewards: Any = field(default=None, metadata={
        "help": "registered rewards and their weights: accuracy, [accuracy, format] or {accuracy: 1.0, judge: 0.5}"})
    reward_options: dict = field(default_factory=dict, metadata={
        "help": "keyword options per reward, e.g. {judge: {model: polm-tiny, template: ...}}"})

    def check_rewards(self) -> None:
        """Raise ValueError when no reward is named (called by the options' ``__post_init__``)."""
        if self.reward_model is None and self.rewards is None:
            raise ValueError("set 'reward_model' (a reward_model stage's folder) or 'rewards' "
                             "(registered rewards with weights, e.g. {accuracy: 1.0})")

    def reward_weights(self) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """``({reward name: weight}, {reward name: options})`` as :func:`score_weighted` takes them."""
        weights = parse_reward_weights(self.rewards) if self.rewards is not None else {}
        options = {name: dict(value) for name, value in self.reward_options.items()}
        if self.reward_model is not None:
            weights.setdefault(REWARD_MODEL, 1.0)
            options[REWARD_MODEL] = {**options.get(REWARD_MODEL, {}), "path": self.reward_model}
        return weights, options


class RewardSource:
    """The rewards a stage's options name, checked against the registry and called on completions."""

    def __init__(self, options: RewardOptions) -> None:
        self.weights, self.options = options.reward_weights()

    def check(self) -> None:
        """Fail on an unknown reward name (listing the registered ones)."""
        from polm.engine.plugins import registry

        for name in self.weights:
            registry("rewards").get(name)

    def __call__(self, rows: Sequence[Row], completions: Sequence[str]) -> torch.Tensor:
        """(N,) rewards of ``completions``, one row (its prompt and fields) per completion."""
        total, _ = score_weighted(self.weights, rows, completions, self.options)
        return torch.tensor(total, dtype=torch.float32)

    def held_out(self, model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row],
                 max_new_tokens: int) -> dict[str, float]:
        """``reward``: the mean reward of greedy completions of ``rows``' prompts."""
        completions = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens)
        return {"reward": float(self(rows, completions).mean())}
