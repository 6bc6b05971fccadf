"""SimPO: reference-free, length-normalised preference optimisation with a target margin.

Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a
Reference-Free Reward", https://arxiv.org/abs/2405.14734.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polm.plugins.alignment.objectives.common import check_positive, check_reference_free, preference_metrics


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: None = None,
    ref_rejected_logps: None = None,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``-log sigmoid(beta (chosen - rejected) - gamma)`` on AVERAGE log-probs.

    The reward of a completion is ``beta`` times its average log-prob per
    completion token, so long answers are not favoured for their length; no
    reference model is involved. ``gamma`` is the target reward margin.

    Args:
        policy_chosen_logps: (B,) AVERAGE log-prob per completion token of each chosen answer
            (``sequence_logps(..., average=True)``), not the sum.
        policy_rejected_logps: (B,) the same for the rejected answers.
        ref_chosen_logps, ref_rejected_logps: must be None (reference-free); tensors are refused.
        beta: reward scale.
        gamma: target margin between the chosen and rejected rewards.

    Returns:
        The mean loss (scalar) and :func:`preference_metrics` of the rewards ``beta * average log-prob``.

    Raises:
        ValueError: reference tensors given, or ``beta`` not positive.
    """
    check_reference_free("simpo", ref_chosen_logps, ref_rejected_logps)
    check_positive(beta, "beta")
    chosen_rewards = beta * policy_chosen_logps  # (B,)
    rejected_rewards = beta * policy_rejected_logps  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses.mean(), preference_metrics(chosen_rewards, rejected_rewards)
