"""Advantage estimators and the masked statistics they use, as pure functions.

Shapes: ``B`` prompts, ``G`` completions per prompt, ``N = B * G`` completions
(the samples of one prompt are consecutive rows), ``C`` completion tokens,
right-padded; ``mask`` is 1 on sampled tokens (the end token included) and 0
on padding. Group estimators take one reward per completion as (B, G); the
per-token ones take (N, C).

References:
    GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models", arXiv:2402.03300 (group-normalised advantages).
    Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
    arXiv:2503.20783 (no division by the group's reward std).
    DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv:2503.14476 (dynamic sampling).
    RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", arXiv:2402.14740 (leave-one-out baseline).
    GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv:1506.02438.
"""

from __future__ import annotations

import torch

STD_EPSILON = 1e-4


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by the group's std when ``scale``.

    ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)`` with the unbiased (n - 1) std, as in TRL;
    Dr. GRPO drops the division (``scale=False``), which over-weights groups of low spread.

    Args:
        rewards: (B, G) rewards, one row per prompt.

    Returns:
        (B, G) advantages; a group whose rewards are all equal gets 0.
    """
    centred = rewards - rewards.mean(-1, keepdim=True)  # (B, G)
    if not scale:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + STD_EPSILON)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages: each reward minus the mean of the *other* rewards of its group.

    ``A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean(r))``.

    Args:
        rewards: (B, G) rewards with G >= 2.

    Returns:
        (B, G) advantages.
    """
    size = rewards.shape[-1]
    if size < 2:
        raise ValueError(f"rloo needs at least 2 completions per prompt, got {size}")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (size - 1)  # (B, G)
    return rewards - others


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: the groups whose rewards are not all equal.

    A group of equal rewards has zero advantage everywhere and only dilutes a
    token-level loss, so DAPO drops it.

    Args:
        rewards: (B, G).

    Returns:
        (B,) bool, True for the groups to keep.
    """
    return (rewards != rewards[..., :1]).any(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the positions where ``mask`` is 1 (0 when there are none); a scalar."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0 and variance 1 over the masked positions; 0 elsewhere."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, the last token of each completion being terminal.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` is 0 after the last token) and
    ``A_t = delta_t + gamma lam A_{t+1}``; the return is ``A_t + V_t``.

    Args:
        rewards: (N, C) per-token rewards (PPO's: a KL penalty on every token, the score on the last).
        values: (N, C) the value head's estimate before each token.
        mask: (N, C) 1 on sampled tokens.
        gamma: discount per token.
        lam: GAE's bias-variance trade-off (1: Monte Carlo returns, 0: one-step TD).

    Returns:
        ``advantages`` and ``returns``, both (N, C), 0 on padding, without gradient.
    """
    rewards, values, mask = rewards.detach(), values.detach() * mask, mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (N,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
