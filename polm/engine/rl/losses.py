"""The clipped policy objective shared by GRPO and PPO, its KL term and its reductions, as pure functions.

Shapes: ``N`` completions, ``C`` completion tokens, right-padded; ``mask`` is
(N, C), 1 on sampled tokens and 0 on padding.

References:
    PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347 (clipped ratio).
    GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models", arXiv:2402.03300 (one advantage per completion, k3 KL to the reference in the loss).
    Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
    arXiv:2503.20783 (no division by each completion's length).
    DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv:2503.14476 (token-level loss, clip-higher).
"""

from __future__ import annotations

import torch

from polm.engine.rl.advantages import masked_mean

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # the reductions of :func:`aggregate`, named after the method of each


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
    * ``dapo``: the mean over all tokens of the batch (every token weighs the same; PPO's reduction too).
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
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return masked_mean(per_token, mask)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo divides by N * max_completion_length; pass max_completion_length")
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
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
    """PPO's clipped surrogate, plus ``beta`` times the k3 KL to a reference.

    Per token, with ``ratio = exp(logp - old_logp)``::

        loss_t = -min(ratio * A_t, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A_t) + beta * KL_t

    reduced by :func:`aggregate`. GRPO gives every token the advantage of its
    completion; PPO gives each token its own (GAE) advantage and takes the
    ``dapo`` reduction (the token mean) without a KL term, its KL penalty being
    in the rewards. DAPO's clip-higher is ``epsilon_high > epsilon_low``.

    Args:
        logps: (N, C) log-probs of the sampled tokens under the policy being trained (with gradients).
        old_logps: (N, C) the same under the policy that sampled them (equal to ``logps`` on the first
            update of a generation batch, which makes ratio 1 and the gradient the policy gradient).
        advantages: (N,) one advantage per completion, or (N, C) one per token.
        mask: (N, C) 1 on completion tokens.
        ref_logps: (N, C) under the reference model; needed when ``beta`` > 0.
        max_completion_length: the generation budget (``dr_grpo`` only).

    Returns:
        ``(loss, metrics)``: metrics are detached scalars ``clip_fraction`` (tokens whose clipped
        term is active, so they pass no gradient), ``approx_kl`` (``mean((logp - old_logp)^2) / 2``, an
        estimate of KL(old || new)) and, with a reference, ``kl`` (the mean k3 KL per token).

    Raises:
        ValueError: ``beta`` > 0 without ``ref_logps``; an unknown ``loss_type``.
    """
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps  # (N, C)
    ratio = torch.exp(log_ratio)
    advantage = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (N, 1) or (N, C)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantage
    per_token = -torch.min(unclipped, clipped)  # (N, C)
    with torch.no_grad():
        metrics = {"clip_fraction": masked_mean((clipped < unclipped).to(mask.dtype), mask),
                   "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)  # (N, C)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta:
            per_token = per_token + beta * kl
    elif beta:
        raise ValueError("beta > 0 needs ref_logps")
    return aggregate(per_token, mask, loss_type, max_completion_length), metrics


def zero_loss(policy: torch.nn.Module) -> torch.Tensor:
    """A loss of 0 from a forward pass of ``policy`` on one token, for a micro-batch with nothing to learn from
    (DAPO's dynamic sampling dropped its groups, no sample was accepted, every pair tied).

    Its gradient is 0, but it takes part in the forward and backward passes: under DDP every process must,
    because the forward pass syncs buffers and the gradient all-reduce waits for every parameter on every
    process, so a process that skipped them would leave the others waiting for ever.
    """
    device = next(policy.parameters()).device
    return policy(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device)).logits.sum() * 0.0
