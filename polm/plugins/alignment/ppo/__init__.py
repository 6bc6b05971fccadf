"""RLHF with PPO: the ``ppo`` stage, its losses and its value head."""

from polm.plugins.alignment.ppo.loss import (
    gae,
    kl_penalised_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from polm.plugins.alignment.ppo.stage import PPOOptions, PPOStage, RolloutBuffer
from polm.plugins.alignment.ppo.value_head import ValueHead

__all__ = [
    "PPOOptions",
    "PPOStage",
    "RolloutBuffer",
    "ValueHead",
    "gae",
    "kl_penalised_rewards",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "whiten",
]
