"""What every connector is: encoder features in, language-model inputs out."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from polm.engine.errors import PolmError


class Connector(torch.nn.Module):
    """Base class of the connectors registered through ``polm_register_connectors``.

    A connector turns the features of one input, (S, encoder width), into
    :meth:`num_tokens` embeddings of the language model's width that replace
    the input's placeholder token. Connectors that act inside the language
    model (``cross_attention``) also implement ``attach``.

    Attributes:
        options: the connector's options, saved with a multimodal model to rebuild it.
    """

    def __init__(self, options: Any = None) -> None:
        super().__init__()
        self.options = dataclasses.asdict(options) if options is not None else {}

    def num_tokens(self, encoder_tokens: int) -> int:
        """Embeddings per input, for an encoder that gives ``encoder_tokens`` tokens per input."""
        return encoder_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, S, encoder width) -> (N, num_tokens(S), lm width)."""
        raise NotImplementedError


def check_heads(lm_width: int, heads: int) -> None:
    """Raise PolmError unless ``heads`` divides the language model's width."""
    if lm_width % heads:
        choices = ", ".join(str(h) for h in range(1, 17) if lm_width % h == 0)
        raise PolmError(f"connector option 'heads' ({heads}) must divide the language model's width {lm_width}; "
                        f"choose one of {choices}")
