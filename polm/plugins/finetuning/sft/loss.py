"""The SFT loss: next-token cross-entropy on labelled tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polm.engine.encoding import IGNORE_INDEX


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of predicting ``labels[t + 1]`` from position ``t``.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, ``-100`` where no loss is taken (prompt,
            non-assistant turns, padding).

    Returns:
        The loss averaged over labelled tokens, and metrics: ``token_accuracy``
        (greedy next-token hits among labelled tokens) and ``label_tokens``.
    """
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    count = mask.sum()
    if count == 0:
        raise ValueError("a batch has no labelled tokens; check max_length and the loss mask")
    loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / count
    with torch.no_grad():
        hits = (shifted_logits.argmax(-1) == targets) & mask
        accuracy = float(hits.sum() / count)
    return loss, {"token_accuracy": accuracy, "label_tokens": float(count)}
