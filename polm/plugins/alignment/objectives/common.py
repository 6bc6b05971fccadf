"""What the preference objectives share: hyperparameter checks and the reward metrics."""

from __future__ import annotations

import torch


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """The metrics every pairwise objective reports.

    Args:
        chosen_rewards: (B,) the objective's reward of each chosen completion.
        rejected_rewards: (B,) the same for the rejected completions.

    Returns:
        ``reward_accuracy`` (fraction of pairs whose chosen reward is strictly
        higher; a tie is not a win), ``reward_margin`` (mean chosen minus
        rejected), ``chosen_reward`` and ``rejected_reward`` (means).
    """
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
    }


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"'{name}' must be positive, got {value}")


def check_flip_rate(value: float, name: str = "label_smoothing") -> None:
    """A probability that a preference label is wrong: below 1/2, else the labels carry no signal."""
    if not 0.0 <= value < 0.5:
        raise ValueError(f"'{name}' must be in [0, 0.5), got {value}")


def check_reference_free(name: str, ref_chosen_logps: object, ref_rejected_logps: object) -> None:
    """Reference-free objectives take ``None`` for the reference log-probs and refuse tensors.

    Refusing rather than ignoring them catches a stage that computes a reference
    model's log-probs for nothing (and a caller who expects them to count).
    """
    if ref_chosen_logps is not None or ref_rejected_logps is not None:
        raise ValueError(f"'{name}' is reference-free: pass None for ref_chosen_logps and ref_rejected_logps")
