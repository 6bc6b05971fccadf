"""PPO for language models, as pure functions on per-token tensors.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
https://arxiv.org/abs/1707.06347; GAE: Schulman et al. 2016, "High-Dimensional
Continuous Control Using Generalized Advantage Estimation",
https://arxiv.org/abs/1506.02438; the per-token KL penalty and the score on the
last token: Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", https://arxiv.org/abs/1909.08593, and Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031.

Every tensor is (B, T): B completions, T completion tokens, right-padded;
``mask`` is 1 on sampled tokens (the end token included) and 0 on padding.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the positions where ``mask`` is 1 (0 when there are none); a scalar."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0 and variance 1 over the masked positions; 0 elsewhere."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


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


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, the last token of each completion being terminal.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` is 0 after the last token) and
    ``A_t = delta_t + gamma lam A_{t+1}``; the return is ``A_t + V_t``.

    Args:
        rewards: (B, T) per-token rewards (see :func:`kl_penalised_rewards`).
        values: (B, T) the value head's estimate before each token.
        mask: (B, T) 1 on sampled tokens.
        gamma: discount per token.
        lam: GAE's bias-variance trade-off (1: Monte Carlo returns, 0: one-step TD).

    Returns:
        ``advantages`` and ``returns``, both (B, T), 0 on padding, without gradient.
    """
    rewards, values, mask = rewards.detach(), values.detach() * mask, mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate ``mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))`` over tokens.

    Args:
        logps: (B, T) log-probs of the sampled tokens under the policy being updated (with gradient).
        old_logps: (B, T) the same under the policy that sampled them.
        advantages: (B, T) advantage estimates (usually whitened).
        mask: (B, T) 1 on sampled tokens.
        clip_range: eps.

    Returns:
        The token-mean loss (scalar) and metrics: ``clip_fraction`` (tokens where the
        clipped term is the larger, so no gradient flows) and ``approx_kl``
        (``mean((logp - old)^2) / 2``, an estimate of KL(old || new)).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clip_fraction": float(masked_mean((clipped > unclipped).float(), mask)),
                   "approx_kl": float(masked_mean(0.5 * log_ratio ** 2, mask))}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped value loss ``mean(max((V - R)^2, (V_clip - R)^2)) / 2`` over tokens.

    ``V_clip = old_values + clip(V - old_values, -eps, eps)`` keeps the value from
    moving more than ``eps`` away from its estimate at sampling time.

    Args:
        values: (B, T) the value head's estimates now (with gradient).
        old_values: (B, T) its estimates when the completions were sampled.
        returns: (B, T) the targets (:func:`gae`'s returns).
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
