"""The Bradley–Terry loss of a reward model on preference pairs.

Bradley and Terry 1952, "Rank Analysis of Incomplete Block Designs"; as a reward
model loss: Ouyang et al. 2022, "Training language models to follow instructions
with human feedback" (InstructGPT), https://arxiv.org/abs/2203.02155, eq. 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polm.plugins.alignment.objectives.common import preference_metrics


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``-log sigmoid(chosen - rejected - margin)``, averaged over pairs.

    Under the Bradley–Terry model the chosen answer is preferred with
    probability ``sigmoid(r(chosen) - r(rejected))``; the loss is that
    probability's negative log-likelihood. ``margin`` asks for a gap of at
    least that much (Llama 2's margin loss); 0 is plain Bradley–Terry.

    Args:
        chosen_scores: (B,) the reward model's scalar score of each chosen completion.
        rejected_scores: (B,) the same for the rejected completions.
        margin: the gap the chosen score should exceed the rejected one by.

    Returns:
        The mean loss (scalar) and :func:`preference_metrics` of the scores
        (``reward_accuracy`` is the pairwise accuracy; a tie is not a win).
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores - margin)  # (B,)
    return losses.mean(), preference_metrics(chosen_scores, rejected_scores)
