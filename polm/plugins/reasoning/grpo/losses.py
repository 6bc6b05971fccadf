"""Advantages and the clipped policy objective of GRPO and its variants, as pure functions.

Shapes: ``B`` prompts, ``G`` completions per prompt, ``N = B * G`` completions
(the samples of one prompt are consecutive rows), ``C`` completion tokens.

References:
    GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models", arXiv:2402.03300 (group-normalised advantages, clipped ratio, k3 KL to the reference).
    Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
    arXiv:2503.20783 (no division by the group's reward std nor by each completion's length).
    DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv:2503.14476 (token-level loss, clip-higher, dynamic sampling).
    RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", arXiv:2402.14740 (leave-one-out baseline).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADVANTAGES = ("group", "rloo")
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


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3; non-negative, unbiased).

    Args:
        logps, ref_logps: (N, C) log-probs of the sampled tokens under the policy and the reference.

    Returns:
        (N, C).
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar the way each variant defines it.

    * ``grpo``: the mean over each completion's tokens, then over completions
      (a token of a short completion weighs more than one of a long completion).
    * ``dapo``: the mean over all tokens of the batch (every token weighs the same).
    * ``dr_grpo``: the sum over all tokens divided by ``N * max_completion_length``,
      a constant, so no length normalisation biases the gradient.

    Args:
        per_token: (N, C) loss per token.
        mask: (N, C) 1 on completion tokens.
        max_completion_length: the generation budget (``dr_grpo`` only).

    Returns:
        A scalar.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo divides by N * max_completion_length; pass max_completion_length")
        return masked.sum() / (per_token.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss_type '{loss_type}'; choose one of {', '.join(LOSS_TYPES)}")


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of PPO with one advantage per completion, plus ``beta`` times the k3 KL.

    Per token, with ``ratio = exp(logp - old_logp)``::

        loss_t = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL_t

    reduced by :func:`aggregate`. DAPO's clip-higher is ``epsilon_high > epsilon_low``.

    Args:
        logps: (N, C) log-probs of the sampled tokens under the policy being trained (with gradients).
        old_logps: (N, C) the same under the policy that sampled them (equal to ``logps`` on the first
            update of a generation batch, which makes ratio 1 and the gradient the policy gradient).
        advantages: (N,) one advantage per completion.
        mask: (N, C) 1 on completion tokens.
        ref_logps: (N, C) under the reference model; needed when ``beta`` > 0.

    Returns:
        ``(loss, metrics)``: metrics are detached scalars ``clip_fraction`` (tokens whose clipped
        term is active, so they pass no gradient) and, with a reference, ``kl`` (mean per token).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)  # (N, C)
    advantage = advantages.unsqueeze(-1)  # (N, 1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantage
    per_token = -torch.min(unclipped, clipped)  # (N, C)
    tokens = mask.sum().clamp(min=1)
    metrics = {"clip_fraction": ((clipped < unclipped).to(mask.dtype) * mask).sum().detach() / tokens}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        metrics["kl"] = (kl * mask).sum().detach() / tokens
        if beta:
            per_token = per_token + beta * kl
    elif beta:
        raise ValueError("beta > 0 needs ref_logps")
    return aggregate(per_token, mask, loss_type, max_completion_length), metrics
