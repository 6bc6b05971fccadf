"""PPO's own losses for language models, as pure functions on per-token tensors.

The clipped policy objective, GAE and whitening are the engine's
(:mod:`polm.engine.rl.losses`, :mod:`polm.engine.rl.advantages`); what only
PPO needs is here: the per-token KL penalty with the score on the last token
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
https://arxiv.org/abs/1909.08593, and Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031),
and the clipped value loss (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms", https://arxiv.org/abs/1707.06347).

Every tensor is (B, T): B completions, T completion tokens, right-padded;
``mask`` is 1 on sampled tokens (the end token included) and 0 on padding.
"""

from __future__ import annotations

import torch

from polm.engine.rl.advantages import masked_mean


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef (logp - ref_logp)`` on every token, plus the score on the last one.

    Args:
        scores: (B,) the sequence-level reward of each completion.
        logps: (B, T) log-probs of the sampled tokens under the sampling policy.
        ref_logps: (B, T) the same under the reference model.
        mask: (B, T) 1 on sampled tokens.
        kl_coef: weight of the KL penalty (the per-token estimate ``logp - ref_logp``).

    Returns:
        (B, T) rewards, 0 on padding; a completion without tokens gets nothing.
    """
    rewards = -kl_coef * (logps - ref_logps) * mask
    lengths = mask.sum(-1).long()  # (B,)
    rows = torch.nonzero(lengths > 0).flatten()
    rewards[rows, lengths[rows] - 1] += scores[rows].to(rewards.dtype)
    return rewards


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped value loss ``mean(max((V - R)^2, (V_clip - R)^2)) / 2`` over tokens.

    ``V_clip = old_values + clip(V - old_values, -eps, eps)`` keeps the value from
    moving more than ``eps`` away from its estimate at sampling time.

    Args:
        values: (B, T) the value head's estimates now (with gradient).
        old_values: (B, T) its estimates when the completions were sampled.
        returns: (B, T) the targets (the returns of :func:`~polm.engine.rl.advantages.gae`).
        mask: (B, T) 1 on sampled tokens.
        clip_range: eps.

    Returns:
        The loss (scalar) and ``value_clip_fraction`` (tokens where the clipped error is the larger).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        metrics = {"value_clip_fraction": float(masked_mean((clipped_error > unclipped_error).float(), mask))}
    return loss, metrics
