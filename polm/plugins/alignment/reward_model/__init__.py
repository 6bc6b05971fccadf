"""Reward models: the ``reward_model`` stage (Bradley–Terry) and the ``reward_model`` reward that uses one."""

from polm.plugins.alignment.reward_model.loss import bradley_terry_loss
from polm.plugins.alignment.reward_model.model import (
    build_reward_model,
    is_reward_model,
    load_reward_model,
    reward_model_reward,
    score_completions,
)
from polm.plugins.alignment.reward_model.stage import RewardModelOptions, RewardModelStage

__all__ = [
    "RewardModelOptions",
    "RewardModelStage",
    "bradley_terry_loss",
    "build_reward_model",
    "is_reward_model",
    "load_reward_model",
    "reward_model_reward",
    "score_completions",
]
