"""The hinge loss of SLiC on reference-normalised log-probs.

Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
Feedback", https://arxiv.org/abs/2305.10425; in the DPO form of Liu et al.
2023, "Statistical Rejection Sampling Improves Preference Optimization"
(RSO), https://arxiv.org/abs/2309.06657.
"""

from __future__ import annotations

import torch

from polm.plugins.alignment.objectives.common import check_positive, preference_metrics


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``max(0, 1 - beta h)`` with ``h`` the log-ratio margin: no loss once the margin reaches ``1 / beta``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            (B,) summed completion log-probs, as for :func:`~polm.plugins.alignment.objectives.dpo.dpo_loss`.
        beta: the inverse of SLiC's margin delta.

    Returns:
        The mean loss (scalar) and :func:`preference_metrics` of ``beta (policy - ref)``.
    """
    check_positive(beta, "beta")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    losses = torch.relu(1 - (chosen_rewards - rejected_rewards))
    return losses.mean(), preference_metrics(chosen_rewards, rejected_rewards)
