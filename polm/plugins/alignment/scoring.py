"""How on-policy alignment stages (``ppo``, ``online_dpo``) score their sampled completions.

Their options carry the engine's reward group (:class:`~polm.engine.option_groups.RewardOptions`):
``rewards: {name: weight}`` and ``reward_options: {name: {option: value}}``, as in every stage that
scores completions. A trained reward model is the reward ``reward_model`` with its folder as an
option: ``rewards: {reward_model: 1.0}, reward_options: {reward_model: {path: runs/demo/01-reward_model}}``.
Every reward is called through :func:`polm.engine.rewards.score_weighted`, so a completion's reward is
the weighted sum of the named rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polm.engine.data import Row
from polm.engine.evaluation import generate
from polm.engine.option_groups import RewardOptions
from polm.engine.rewards import score_weighted


class RewardSource:
    """The rewards a stage's options name, called on completions (the names are checked by ``Stage.check``)."""

    def __init__(self, options: RewardOptions) -> None:
        self.weights, self.options = options.reward_weights(), options.reward_options

    def __call__(self, rows: Sequence[Row], completions: Sequence[str]) -> torch.Tensor:
        """(N,) rewards of ``completions``, one row (its prompt and fields) per completion."""
        total, _ = score_weighted(self.weights, rows, completions, self.options)
        return torch.tensor(total, dtype=torch.float32)

    def held_out(self, model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row],
                 max_new_tokens: int) -> dict[str, float]:
        """``reward``: the mean reward of greedy completions of ``rows``' prompts."""
        completions = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens)
        return {"reward": float(self(rows, completions).mean())}
