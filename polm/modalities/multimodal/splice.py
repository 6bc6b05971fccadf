"""Splicing media embeddings into a batch of token embeddings, and folding outputs back onto the tokens.

Each media part is one placeholder id (negative) in ``input_ids``. Its
connector gives K embeddings, so a row grows by K - 1 per placeholder; the
rows are padded again on the side their padding was (left for generation
prompts, right otherwise). Position ids continue through the K embeddings and
shift the tokens after them, restarting where the given positions restart
(packed samples). :meth:`Spliced.fold` takes the output at each original
token (for a placeholder: at its last embedding, which predicts the next
token), so logits line up with ``input_ids`` and labels as for text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spliced:
    """A spliced batch.

    Attributes:
        embeds: (B, L, D) input embeddings with the media embeddings in place of the placeholders.
        attention_mask: (B, L) 1 on real tokens and media embeddings.
        position_ids: (B, L).
        index: (B, T) where each original token's output is in the spliced rows.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor

    def fold(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) outputs of the spliced rows -> (B, T, ...) outputs at the original tokens."""
        index = self.index.view(*self.index.shape, *([1] * (outputs.dim() - 2)))
        return torch.gather(outputs, 1, index.expand(-1, -1, *outputs.shape[2:]))


def splice(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    media: list[list[torch.Tensor]],
) -> Spliced:
    """Put each row's media embeddings in place of its placeholders.

    Args:
        embeds: (B, T, D) token embeddings (anything at the placeholders).
        input_ids: (B, T); ids below 0 are placeholders.
        attention_mask: (B, T) or None (every token real).
        position_ids: (B, T) or None (``cumsum(attention_mask) - 1``, as generation counts them).
        media: per row, one (K, D) tensor per placeholder in order.
    """
    batch, length = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = position_ids if position_ids is not None else (mask.cumsum(-1) - 1).clamp(min=0)
    left = bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # generation prompts are left-padded
    rows = []
    for b in range(batch):
        placeholders = (input_ids[b] < 0).nonzero().flatten().tolist()
        if len(placeholders) != len(media[b]):
            raise ValueError(f"row {b} has {len(placeholders)} media placeholders and {len(media[b])} media inputs")
        sizes = torch.ones(length, dtype=torch.long)
        for t, tokens in zip(placeholders, media[b]):
            sizes[t] = tokens.shape[0]
        pieces, start = [], 0
        for t, tokens in zip(placeholders, media[b]):
            pieces += [embeds[b, start:t], tokens.to(embeds.dtype)]
            start = t + 1
        pieces.append(embeds[b, start:])
        ends = sizes.cumsum(0)  # (T,) one past each token's last spliced slot
        rows.append((torch.cat(pieces), mask[b].repeat_interleave(sizes),
                     _spliced_positions(positions[b], sizes), ends - 1))
    width = max(row[0].shape[0] for row in rows)
    out_embeds = embeds.new_zeros(batch, width, embeds.shape[-1])
    out_mask = mask.new_zeros(batch, width)
    out_positions = positions.new_zeros(batch, width)
    index = torch.empty(batch, length, dtype=torch.long, device=input_ids.device)
    for b, (row_embeds, row_mask, row_positions, row_index) in enumerate(rows):
        offset = width - row_embeds.shape[0] if left else 0
        span = slice(offset, offset + row_embeds.shape[0])
        out_embeds[b, span], out_mask[b, span], out_positions[b, span] = row_embeds, row_mask, row_positions
        index[b] = row_index.to(index.device) + offset
    return Spliced(out_embeds, out_mask, out_positions, index)


def _spliced_positions(positions: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Positions of one spliced row: K consecutive ones per placeholder, later tokens shifted by K - 1.

    The shift restarts with the positions (a packed sample starts at position 0).
    """
    extra = (sizes - 1).to(positions.device)  # (T,)
    before = extra.cumsum(0) - extra  # (T,) extra slots before each token, over the whole row
    starts = positions == 0  # a packed sample starts at position 0
    at_start = torch.where(starts, before, torch.zeros_like(before))
    shift = before - at_start.cummax(0).values  # extra slots before each token within its sample
    first = (positions + shift).repeat_interleave(sizes.to(positions.device))  # (L,)
    within = torch.arange(int(sizes.sum()), device=positions.device) - \
        (sizes.cumsum(0) - sizes).to(positions.device).repeat_interleave(sizes.to(positions.device))
    return first + within
