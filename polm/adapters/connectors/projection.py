"""Per-token projections: ``linear`` (LLaVA) and ``mlp2x_gelu`` (LLaVA-1.5), one embedding per encoder token.

LLaVA: Liu et al. 2023, https://arxiv.org/abs/2304.08485; LLaVA-1.5: Liu et al. 2023,
https://arxiv.org/abs/2310.03744.
"""

from __future__ import annotations

import torch

from polm.engine.media import Connector


class LinearConnector(Connector):
    """One linear map from the encoder's width to the language model's."""

    def __init__(self, encoder_width: int, lm_width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(encoder_width, lm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, S, E) -> (N, S, D)."""
        return self.proj(features)


class MLPConnector(Connector):
    """Two linear layers with a GELU between them (``mlp2x_gelu``)."""

    def __init__(self, encoder_width: int, lm_width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(encoder_width, lm_width), torch.nn.GELU(), torch.nn.Linear(lm_width, lm_width)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, S, E) -> (N, S, D)."""
        return self.proj(features)
