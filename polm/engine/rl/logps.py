"""Completion log-probs of labelled rows: what preference and reward stages score a model with.

A row is ``[prompt | completion]`` with labels on the completion only
(:func:`~polm.engine.encoding.encode_completion`), so a row's log-prob is the
sum (or mean) over its completion tokens. Sampled rollouts are scored token by
token instead, by :func:`polm.engine.rl.rollout.completion_token_logps`.
"""

from __future__ import annotations

import torch

from polm.engine.encoding import IGNORE_INDEX, media_inputs


def completion_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probs of the labelled tokens, summed (or averaged) per row.

    Position ``t`` predicts ``labels[t + 1]``, as in the SFT loss.

    Args:
        logits: (N, T, V) model outputs.
        labels: (N, T) target ids, ``-100`` where a token is not scored (prompt, padding).
        average: divide each row's sum by its number of labelled tokens.

    Returns:
        (N,) float32 log-probs.

    Raises:
        ValueError: a row has no labelled token.
    """
    logits = logits[:, :-1].float()  # (N, T-1, V)
    targets = labels[:, 1:]  # (N, T-1)
    mask = targets != IGNORE_INDEX
    counts = mask.sum(-1)  # (N,)
    if bool((counts == 0).any()):
        raise ValueError("a row has no labelled completion token; check max_length and the loss mask")
    # gather - logsumexp rather than log_softmax: no second (N, T-1, V) tensor.
    picked = torch.gather(logits, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    token_logps = (picked - logits.logsumexp(-1)) * mask
    sums = token_logps.sum(-1)  # (N,)
    return sums / counts if average else sums


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Completion log-probs of every row of ``batch`` under ``model``: (N,), summed or averaged per token.

    Image and audio parts of multimodal rows reach the model through ``batch["media"]``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **media_inputs(model, batch.get("media"))).logits
    return completion_logps(logits, batch["labels"], average)
