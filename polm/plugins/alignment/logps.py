"""Preference pairs as tokens, and completion log-probs from a model's logits.

A pair is encoded twice with the engine's :func:`~polm.engine.encoding.encode_completion`
(prompt + chosen, prompt + rejected), so prompt tokens carry no label and
only completion tokens are scored. A batch of B pairs stacks the B chosen
rows and then the B rejected rows, so one forward pass scores both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from polm.engine.data import Row, row_format
from polm.engine.encoding import IGNORE_INDEX, Encoded, encode_completion, media_inputs, pad_batch, truncate
from polm.engine.errors import PolmError


@dataclass
class EncodedPair:
    """One preference pair in tokens.

    Attributes:
        chosen: prompt + chosen answer, labels on the answer only.
        rejected: prompt + rejected answer.
        ref_logps: ``(chosen, rejected)`` log-probs under the reference model once precomputed, else None.
    """

    chosen: Encoded
    rejected: Encoded
    ref_logps: tuple[float, float] | None = None


def encode_pair(tokenizer: Any, row: Row, max_length: int) -> EncodedPair | None:
    """Encode a ``{prompt, chosen, rejected}`` row; None when either side keeps no answer token within ``max_length``.

    Raises:
        PolmError: the row is not a preference row.
    """
    if row_format(row) != "preference":
        raise PolmError(f"a preference stage needs rows with prompt, chosen and rejected; got fields {sorted(row)}")
    chosen = truncate(encode_completion(tokenizer, row["prompt"], row["chosen"]), max_length)
    rejected = truncate(encode_completion(tokenizer, row["prompt"], row["rejected"]), max_length)
    if chosen is None or rejected is None:
        return None
    return EncodedPair(chosen, rejected)


def collate_pairs(pairs: Sequence[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack B pairs into one right-padded batch of 2B rows: the chosen answers, then the rejected ones.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: (2B, T) as from
        :func:`~polm.engine.encoding.pad_batch`; and ``ref_logps``: (2B,) in the
        same order when every pair has precomputed reference log-probs.
    """
    batch = pad_batch([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], pad_token_id)
    if all(pair.ref_logps is not None for pair in pairs):
        batch["ref_logps"] = torch.tensor([pair.ref_logps[0] for pair in pairs]
                                          + [pair.ref_logps[1] for pair in pairs])
    return batch


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

    Image and audio parts of multimodal pairs reach the model through ``batch["media"]``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **media_inputs(model, batch.get("media"))).logits
    return completion_logps(logits, batch["labels"], average)
