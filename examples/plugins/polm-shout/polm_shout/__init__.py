"""polm-shout: an example third-party polm plugin.

polm finds it through the entry point in ``pyproject.toml``::

    [project.entry-points.polm]
    shout = "polm_shout"

and calls the two hooks below, which contribute the reward ``shout`` and the
language-modelling objective ``smoothed_completion`` (``sft: {objective: smoothed_completion}``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from polm import hookimpl
from polm.engine.encoding import IGNORE_INDEX


def shout_reward(prompts: list[Any], completions: list[str], **fields: Any) -> list[float]:
    """The fraction of upper-case letters in each completion (0.0 when it has no letters).

    ``"HELLO"`` scores 1.0, ``"Hello"`` 0.2 and ``"42!"`` 0.0.
    """
    scores = []
    for completion in completions:
        letters = [character for character in completion if character.isalpha()]
        scores.append(sum(character.isupper() for character in letters) / len(letters) if letters else 0.0)
    return scores


def smoothed_completion_loss(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SFT next-token cross-entropy with label smoothing (Szegedy et al., 2016, "Rethinking the
    Inception Architecture"); ``smoothing=0`` is plain ``sft``.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, ``-100`` where no loss is taken.
        smoothing: the probability mass spread evenly over the vocabulary.

    Returns:
        The loss averaged over labelled tokens, and ``token_accuracy`` and ``label_tokens``.
    """
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    count = mask.sum()
    if count == 0:
        raise ValueError("a batch has no labelled tokens")
    loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing) / count
    with torch.no_grad():
        accuracy = float(((shifted_logits.argmax(-1) == targets) & mask).sum() / count)
    return loss, {"token_accuracy": accuracy, "label_tokens": float(count)}


@hookimpl
def polm_register_rewards(register):
    register("shout", shout_reward, description="fraction of upper-case letters in each completion")


@hookimpl
def polm_register_objectives(register):
    register("smoothed_completion", smoothed_completion_loss, family="language_modelling",
             description="SFT cross-entropy with label smoothing")
