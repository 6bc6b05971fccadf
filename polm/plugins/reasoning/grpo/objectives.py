"""The ``policy_gradient`` objectives of ``grpo`` and ``ppo``: PPO's clipped surrogate under three reductions.

Each is :func:`polm.engine.rl.losses.clipped_policy_loss` (per token, the clipped ratio times the advantage,
plus ``beta`` times the k3 KL to the reference) reduced as its paper defines it; shapes there: (N, C) log-probs
and mask, (N,) or (N, C) advantages.
"""

from __future__ import annotations

from typing import Any

import torch

from polm.engine.rl.losses import clipped_policy_loss


def grpo_objective(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                   ref_logps: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float,
                   **context: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The mean over each completion's tokens, then over completions (Shao et al. 2024, "DeepSeekMath",
    arXiv:2402.03300, eq. 3)."""
    return clipped_policy_loss(logps, old_logps, advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                               loss_type="grpo", ref_logps=ref_logps, beta=beta)


def dapo_objective(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                   ref_logps: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float,
                   **context: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The mean over every completion token, so long completions weigh by their length (Yu et al. 2025,
    "DAPO", arXiv:2503.14476, eq. 8); PPO's own reduction. Registered ``token_level``."""
    return clipped_policy_loss(logps, old_logps, advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                               loss_type="dapo", ref_logps=ref_logps, beta=beta)


def dr_grpo_objective(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                      ref_logps: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float,
                      max_completion_length: int, **context: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The sum over tokens divided by ``N * max_completion_length``, a constant, so no length normalisation
    biases the gradient (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783)."""
    return clipped_policy_loss(logps, old_logps, advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                               loss_type="dr_grpo", ref_logps=ref_logps, beta=beta,
                               max_completion_length=max_completion_length)
