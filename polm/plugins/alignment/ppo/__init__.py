"""RLHF with PPO: the ``ppo`` stage, its own losses and its value head."""

from polm.plugins.alignment.ppo.loss import kl_penalised_rewards, ppo_value_loss
from polm.plugins.alignment.ppo.stage import PPOOptions, PPOStage
from polm.plugins.alignment.ppo.value_head import ValueHead

__all__ = [
    "PPOOptions",
    "PPOStage",
    "ValueHead",
    "kl_penalised_rewards",
    "ppo_value_loss",
]
