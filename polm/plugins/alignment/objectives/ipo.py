"""IPO: identity preference optimisation.

Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
Human Preferences", https://arxiv.org/abs/2310.12036.
"""

from __future__ import annotations

import torch

from polm.plugins.alignment.objectives.common import check_positive, preference_metrics


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Regress the log-ratio margin onto ``1 / (2 beta)``: ``(h - 1 / (2 beta))^2``.

    ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``;
    ``beta`` is the paper's regularisation strength tau. Unlike DPO's sigmoid,
    the square does not reward pushing the margin beyond its target, which is
    what keeps IPO from overfitting deterministic preferences.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            (B,) summed completion log-probs, as for :func:`~polm.plugins.alignment.objectives.dpo.dpo_loss`.
        beta: tau; the target margin is ``1 / (2 beta)``.

    Returns:
        The mean loss (scalar) and :func:`preference_metrics` of ``beta (policy - ref)``.
    """
    check_positive(beta, "beta")
    chosen_ratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = (chosen_ratios - rejected_ratios - 1 / (2 * beta)) ** 2
    return losses.mean(), preference_metrics(beta * chosen_ratios, beta * rejected_ratios)
