"""Preference pairs as tokens, and their log-probs under the reference model scored once before training.

A pair is encoded twice with the engine's :func:`~polm.engine.encoding.encode_completion`
(prompt + chosen, prompt + rejected), so prompt tokens carry no label and
only completion tokens are scored (:func:`polm.engine.rl.logps.sequence_logps`).
A batch of B pairs stacks the B chosen rows and then the B rejected rows, so
one forward pass scores both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from polm.engine.data import Row, row_format
from polm.engine.encoding import Encoded, encode_completion, pad_batch, truncate
from polm.engine.errors import PolmError
from polm.engine.rl.reference import ReferenceModel


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


def precompute_reference_logps(reference: ReferenceModel, policy: torch.nn.Module, pairs: Sequence[EncodedPair],
                               pad_token_id: int, batch_size: int, device: torch.device) -> list[EncodedPair]:
    """``pairs`` with ``ref_logps`` filled in by ``reference``, scored ``batch_size`` pairs at a time on ``device``.

    ``policy`` is the model the stage trains (for a peft policy, the reference is that model without its adapters).
    """
    if reference.shares_policy:
        policy.to(device)
    done: list[EncodedPair] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items() if k != "ref_logps"}
        chosen, rejected = reference.logps(policy, batch).cpu().chunk(2)
        done += [replace(pair, ref_logps=(float(c), float(r))) for pair, c, r in zip(chunk, chosen, rejected)]
    return done
