"""KTO's unpaired rows ``{prompt, completion, label}`` in tokens, and batches with mismatched pairs.

Preference rows are accepted too: each pair ``{prompt, chosen, rejected}``
gives two unpaired rows, the chosen answer desirable (``label: true``) and the
rejected one undesirable (``label: false``). Unpaired data need not be
balanced; ``desirable_weight`` and ``undesirable_weight`` rebalance it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polm.engine.data import Row, row_format
from polm.engine.encoding import Encoded, encode_completion, pad_batch, truncate
from polm.engine.errors import PolmError


def unpaired_rows(rows: Sequence[Row]) -> list[Row]:
    """``{prompt, completion, label}`` rows: unpaired rows as they are, two for each preference row.

    Raises:
        PolmError: a row is neither, or its label is not a boolean.
    """
    unpaired = []
    for index, row in enumerate(rows):
        if row_format(row) == "preference":
            unpaired += [{"prompt": row["prompt"], "completion": row["chosen"], "label": True},
                         {"prompt": row["prompt"], "completion": row["rejected"], "label": False}]
        elif row_format(row) == "completion" and isinstance(row.get("label"), bool):
            unpaired.append(row)
        else:
            raise PolmError(f"kto: row {index} has fields {sorted(row)}; expected {{prompt, completion, label}} "
                            "with a true/false label, or preference rows {prompt, chosen, rejected}")
    return unpaired


@dataclass
class EncodedCompletion:
    """An unpaired row in tokens: ``example`` labels the completion only; it starts at ``prompt_length``."""

    example: Encoded
    prompt_length: int
    desirable: bool


def encode_unpaired(tokenizer: object, row: Row, max_length: int) -> EncodedCompletion | None:
    """Encode an unpaired row; None when no completion token fits ``max_length``."""
    example = truncate(encode_completion(tokenizer, row["prompt"], row["completion"]), max_length)
    if example is None:
        return None
    prompt_length = next(i for i, label in enumerate(example.labels) if label != -100)
    return EncodedCompletion(example, prompt_length, bool(row["label"]))


def mismatched(items: Sequence[EncodedCompletion], max_length: int) -> list[Encoded]:
    """Row ``i``'s prompt with row ``i + 1``'s completion (cyclically), for KTO's KL estimate.

    A spliced row longer than ``max_length`` is cut; one left without a completion
    token falls back to row ``i`` itself. With one row, the row is its own mismatch.
    """
    spliced = []
    for i, item in enumerate(items):
        other = items[(i + 1) % len(items)]
        example = Encoded(item.example.input_ids[: item.prompt_length] + other.example.input_ids[other.prompt_length:],
                          item.example.labels[: item.prompt_length] + other.example.labels[other.prompt_length:])
        spliced.append(truncate(example, max_length) or item.example)
    return spliced


def collate_unpaired(items: Sequence[EncodedCompletion], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """B rows as one right-padded batch of 2B: the B rows, then their B mismatched rows.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: (2B, T); ``desirable``: (B,) bool.
    """
    batch = pad_batch([item.example for item in items] + mismatched(items, max_length), pad_token_id)
    batch["desirable"] = torch.tensor([item.desirable for item in items])
    return batch
