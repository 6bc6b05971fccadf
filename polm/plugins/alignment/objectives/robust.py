"""Robust DPO: an unbiased DPO loss under preference labels flipped at a known rate.

Chowdhury, Kini and Natarajan 2024, "Provably Robust DPO: Aligning Language
Models with Noisy Feedback", https://arxiv.org/abs/2403.00409.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polm.plugins.alignment.objectives.common import check_flip_rate, check_positive, preference_metrics


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``[(1 - eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps)`` with ``l(x) = -log sigmoid(x)``.

    Where cDPO averages the two labels' losses (and so is biased), rDPO
    subtracts the flipped one, which makes the loss an unbiased estimate of the
    clean-label DPO loss when labels flip with probability ``eps``. A single
    pair's loss may be negative. ``eps = 0`` is plain DPO.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            (B,) summed completion log-probs, as for :func:`~polm.plugins.alignment.objectives.dpo.dpo_loss`.
        beta: the KL strength, as in DPO.
        label_smoothing: eps, the rate at which preference labels are flipped, in [0, 0.5).

    Returns:
        The mean loss (scalar) and :func:`preference_metrics` of ``beta (policy - ref)``.
    """
    check_positive(beta, "beta")
    check_flip_rate(label_smoothing)
    eps = label_smoothing
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    logits = chosen_rewards - rejected_rewards  # (B,)
    losses = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses.mean(), preference_metrics(chosen_rewards, rejected_rewards)
