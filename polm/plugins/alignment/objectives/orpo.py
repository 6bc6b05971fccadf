"""ORPO: supervised fine-tuning with an odds-ratio penalty on the rejected answer, reference-free.

Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without
Reference Model", https://arxiv.org/abs/2403.07691.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polm.plugins.alignment.objectives.common import check_reference_free, preference_metrics

#: Average log-probs are clamped below this so that ``log(1 - p)`` stays finite when ``p`` rounds to 1.
MAX_AVERAGE_LOGP = -1e-6


def log_odds(average_logps: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` for ``p = exp(average_logps)``, computed stably; same shape as the input."""
    logps = average_logps.clamp(max=MAX_AVERAGE_LOGP)
    return logps - torch.log(-torch.expm1(logps))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: None = None,
    ref_rejected_logps: None = None,
    lambda_: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_SFT + lambda_ L_OR`` on AVERAGE log-probs (the paper's eq. 6).

    ``L_SFT = -mean(chosen)`` is the NLL of the chosen answers, each averaged
    over its tokens and then over the batch (a token-weighted mean would count
    long answers more). ``L_OR = -log sigmoid(log odds(chosen) - log odds(rejected))``
    where ``odds(y) = p / (1 - p)`` and ``p = exp(average log-prob)``.

    Args:
        policy_chosen_logps: (B,) AVERAGE log-prob per completion token of each chosen answer.
        policy_rejected_logps: (B,) the same for the rejected answers.
        ref_chosen_logps, ref_rejected_logps: must be None (reference-free); tensors are refused.
        lambda_: weight of the odds-ratio term (the paper's lambda; TRL calls it beta).

    Returns:
        The mean loss (scalar) and metrics: :func:`preference_metrics` of the
        average log-probs (the rewards: the chosen answer wins when it is more
        likely per token), ``nll`` (L_SFT) and ``log_odds_ratio`` (the mean log odds ratio).

    Raises:
        ValueError: reference tensors given, or ``lambda_`` negative.
    """
    check_reference_free("orpo", ref_chosen_logps, ref_rejected_logps)
    if lambda_ < 0:
        raise ValueError(f"'lambda_' must not be negative, got {lambda_}")
    ratio = log_odds(policy_chosen_logps) - log_odds(policy_rejected_logps)  # (B,)
    nll = -policy_chosen_logps.mean()
    odds_ratio_loss = -F.logsigmoid(ratio).mean()
    metrics = preference_metrics(policy_chosen_logps, policy_rejected_logps)
    metrics.update(nll=float(nll.detach()), log_odds_ratio=float(ratio.detach().mean()))
    return nll + lambda_ * odds_ratio_loss, metrics
