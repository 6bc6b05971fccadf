"""KTO: prospect-theoretic alignment from unpaired desirable / undesirable examples.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", https://arxiv.org/abs/2402.01306.

KTO reads unpaired rows ``{"prompt", "completion", "label"}`` (``label`` true
for a desirable completion), so its signature differs from the pairwise family.
"""

from __future__ import annotations

import torch

from polm.plugins.alignment.objectives.common import check_positive


def kl_estimate(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean(policy - ref))``, detached.

    Args:
        policy_logps: (M,) summed log-probs of mismatched completions (a completion
            scored under another row's prompt) under the policy.
        ref_logps: (M,) the same under the reference model.

    Returns:
        A 0-dim tensor: the batch estimate of KL(policy || reference), clamped at 0, without gradient.
    """
    return (policy_logps - ref_logps).detach().mean().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    reference_point: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The KTO loss of a batch of unpaired completions.

    With ``r = policy - ref`` and ``z0`` the reference point, a desirable
    completion costs ``desirable_weight (1 - sigmoid(beta (r - z0)))`` and an
    undesirable one ``undesirable_weight (1 - sigmoid(beta (z0 - r)))``; the
    loss is the mean over the batch.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy.
        ref_logps: (B,) the same under the reference model.
        labels: (B,) bool, True for desirable completions.
        reference_point: z0, the KL estimate (see :func:`kl_estimate`); detached and clamped at 0 here.
        beta: the reward scale, as in DPO.
        desirable_weight, undesirable_weight: weights that balance unequal numbers of each kind
            (the paper keeps ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)``
            in [1, 4/3]).

    Returns:
        The mean loss (scalar) and metrics: ``chosen_reward`` / ``rejected_reward``
        (mean ``beta r`` of the desirable / undesirable rows, each only when the
        batch has such rows, and ``reward_margin`` their difference when it has
        both), ``reward_accuracy`` (fraction of rows whose ``beta (r - z0)`` has
        the sign of their label) and ``kl`` (z0).
    """
    check_positive(beta, "beta")
    check_positive(desirable_weight, "desirable_weight")
    check_positive(undesirable_weight, "undesirable_weight")
    labels = labels.bool()
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    rewards = beta * (policy_logps - ref_logps)  # (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(rewards - beta * z0))  # (B,)
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * z0 - rewards))  # (B,)
    losses = torch.where(labels, desirable, undesirable)
    with torch.no_grad():
        above = rewards > beta * z0
        metrics = {"reward_accuracy": float((above == labels).float().mean()), "kl": float(z0)}
        if labels.any():
            metrics["chosen_reward"] = float(rewards[labels].mean())
        if (~labels).any():
            metrics["rejected_reward"] = float(rewards[~labels].mean())
        if labels.any() and (~labels).any():
            metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
    return losses.mean(), metrics
