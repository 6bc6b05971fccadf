"""Packing several examples into one row, each attending only to itself.

A packed row concatenates examples; ``position_ids`` restart at 0 for each
one. Called with ``attention_mask=None`` and those position ids, transformers
builds a block-diagonal causal mask (``find_packed_sequence_indices`` in
``transformers.masking_utils``), so samples never see each other, on every
attention implementation. The first token of each example gets no label, so
no example is trained to predict its neighbour's first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polm.engine.encoding import IGNORE_INDEX, Encoded


@dataclass
class Packed:
    """One packed row: concatenated examples with restarting positions."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def _append(row: Packed, example: Encoded) -> None:
    row.input_ids += example.input_ids
    row.labels += [IGNORE_INDEX] + example.labels[1:]
    row.position_ids += list(range(len(example.input_ids)))


def pack(examples: Sequence[Encoded], max_length: int) -> list[Packed]:
    """Greedily fill rows of at most ``max_length`` tokens, keeping the examples' order."""
    rows: list[Packed] = []
    current = Packed([], [], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > max_length:
            rows.append(current)
            current = Packed([], [], [])
        _append(current, example)
    if current.input_ids:
        rows.append(current)
    return rows


def concatenate(examples: Sequence[Encoded]) -> Packed:
    """The padding-free batch: every example of a micro-batch in one row."""
    row = Packed([], [], [])
    for example in examples:
        _append(row, example)
    return row


def collate_packed(rows: Sequence[Packed], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``: (B, T); ``num_tokens``: the
        real (non-padding) tokens. Padding gets its own positions from 0, so it
        forms a separate block that no real token attends to.
    """
    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(length).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        position_ids[i, :n] = torch.tensor(row.position_ids)
        position_ids[i, n:] = torch.arange(length - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "num_tokens": sum(len(row.input_ids) for row in rows)}
