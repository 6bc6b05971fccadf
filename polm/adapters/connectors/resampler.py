"""``resampler``: a fixed number of learned queries cross-attend to the encoder's tokens.

However long the input (1500 tokens for 30 s of Whisper audio), the language
model gets ``num_queries`` embeddings. Perceiver Resampler: Alayrac et al. 2022
(Flamingo), https://arxiv.org/abs/2204.14198; Q-Former: Li et al. 2023 (BLIP-2),
https://arxiv.org/abs/2301.12597.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polm.adapters.connectors.base import check_heads
from polm.engine.media import Connector
from polm.engine.options import parse_options


@dataclass
class ResamplerOptions:
    """Options of ``resampler``."""

    num_queries: int = field(default=32, metadata={"help": "learned queries, i.e. embeddings per input"})
    depth: int = field(default=2, metadata={"help": "cross-attention blocks the queries go through"})
    heads: int = field(default=4, metadata={"help": "attention heads; must divide the language model's width"})

    def __post_init__(self) -> None:
        for name in ("num_queries", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be at least 1, got {getattr(self, name)}")


class _Block(torch.nn.Module):
    """Queries attend to the features, then an MLP; both residual, pre-norm."""

    def __init__(self, width: int, encoder_width: int, heads: int) -> None:
        super().__init__()
        self.norm_queries = torch.nn.LayerNorm(width)
        self.norm_features = torch.nn.LayerNorm(encoder_width)
        self.attention = torch.nn.MultiheadAttention(width, heads, kdim=encoder_width, vdim=encoder_width,
                                                     batch_first=True)
        self.norm_mlp = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """queries (N, Q, D), features (N, S, E) -> (N, Q, D)."""
        keys = self.norm_features(features)
        queries = queries + self.attention(self.norm_queries(queries), keys, keys, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class Resampler(Connector):
    """``num_queries`` learned queries, ``depth`` blocks of cross-attention to the features, a final norm."""

    def __init__(self, encoder_width: int, lm_width: int, **options: object) -> None:
        parsed = parse_options("connector 'resampler'", ResamplerOptions, options)
        check_heads(lm_width, parsed.heads)
        super().__init__(parsed)
        self.queries = torch.nn.Parameter(torch.randn(parsed.num_queries, lm_width) * lm_width ** -0.5)
        self.blocks = torch.nn.ModuleList(_Block(lm_width, encoder_width, parsed.heads) for _ in range(parsed.depth))
        self.norm = torch.nn.LayerNorm(lm_width)

    def num_tokens(self, encoder_tokens: int) -> int:
        return self.queries.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, S, E) -> (N, num_queries, D)."""
        queries = self.queries.expand(features.shape[0], -1, -1)  # (N, Q, D)
        for block in self.blocks:
            queries = block(queries, features)
        return self.norm(queries)

