"""DPO and conservative DPO (cDPO).

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", https://arxiv.org/abs/2305.18290. cDPO (label
smoothing): Mitchell 2023, "A note on DPO with noisy preferences".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polm.plugins.alignment.objectives.common import check_flip_rate, check_positive, preference_metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO sigmoid loss, optionally with label smoothing (cDPO).

    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``
    and ``eps = label_smoothing``, each pair's loss is
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; ``eps = 0`` is plain DPO.

    Args:
        policy_chosen_logps: (B,) summed completion log-probs of the chosen answers under the policy.
        policy_rejected_logps: (B,) the same for the rejected answers.
        ref_chosen_logps: (B,) chosen log-probs under the reference model (no gradient needed).
        ref_rejected_logps: (B,) rejected log-probs under the reference model.
        beta: strength of the KL penalty towards the reference (the reward's temperature).
        label_smoothing: assumed probability that a pair's preference is flipped, in [0, 0.5).

    Returns:
        The mean loss over pairs (scalar) and :func:`preference_metrics` of the
        implicit rewards ``beta (policy - ref)``.
    """
    check_positive(beta, "beta")
    check_flip_rate(label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    logits = chosen_rewards - rejected_rewards  # (B,) = beta h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), preference_metrics(chosen_rewards, rejected_rewards)
