"""``cross_attention``: gated cross-attention blocks inserted into the language model's layers (Flamingo).

Each media input becomes a single learned marker embedding in the token
stream; its features are read instead by cross-attention blocks that run
before the chosen decoder layers. Every block's output passes through
``tanh(gate)`` with the gate initialised at 0, so the language model computes
exactly what it did before training starts. Alayrac et al. 2022,
https://arxiv.org/abs/2204.14198 (here every token of a row attends to all of
the row's media, rather than only to the latest image).

The blocks are forward pre-hooks on the decoder layers, installed only while
a multimodal forward or generation runs: the language model's own modules and
saved weights stay exactly those of the language model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from polm.adapters.connectors.base import check_heads
from polm.engine.errors import PolmError
from polm.engine.media import Connector
from polm.engine.options import parse_options


@dataclass
class CrossAttentionOptions:
    """Options of ``cross_attention``."""

    every: int = field(default=1, metadata={"help": "a gated block before every N-th decoder layer (from the first)"})
    heads: int = field(default=4, metadata={"help": "attention heads; must divide the language model's width"})

    def __post_init__(self) -> None:
        for name in ("every", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be at least 1, got {getattr(self, name)}")


class GatedBlock(torch.nn.Module):
    """``h + tanh(a) * attend(h, media)`` then ``h + tanh(b) * mlp(h)``, gates ``a`` and ``b`` starting at 0."""

    def __init__(self, width: int, encoder_width: int, heads: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, heads, kdim=encoder_width, vdim=encoder_width,
                                                     batch_first=True)
        self.attention_gate = torch.nn.Parameter(torch.zeros(1))
        self.norm_mlp = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))
        self.mlp_gate = torch.nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, media: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), media (B, M, E), missing (B, M) True on padding -> (B, T, D).

        A row without media (every key missing) is left unchanged.
        """
        has_media = (~missing).any(-1)  # (B,)
        missing = missing & has_media[:, None]  # rows without media attend to zeros, then are masked out
        attended = self.attention(self.norm(hidden), media, media, key_padding_mask=missing, need_weights=False)[0]
        gate = torch.tanh(self.attention_gate) * has_media[:, None, None].to(hidden.dtype)  # (B, 1, 1)
        hidden = hidden + gate * attended
        return hidden + torch.tanh(self.mlp_gate) * has_media[:, None, None].to(hidden.dtype) * \
            self.mlp(self.norm_mlp(hidden))


def decoder_layers(lm: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder layers: the module list as long as ``config.num_hidden_layers``."""
    expected = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    for _, module in lm.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == expected:
            return module
    raise PolmError(f"cross_attention: no list of {expected} decoder layers in {type(lm).__name__}; "
                    "use a connector that works on the inputs (mlp2x_gelu, resampler)")


class CrossAttentionConnector(Connector):
    """Gated cross-attention into the decoder layers, plus one learned marker embedding per input."""

    def __init__(self, encoder_width: int, lm_width: int, lm_layers: int, **options: object) -> None:
        parsed = parse_options("connector 'cross_attention'", CrossAttentionOptions, options)
        check_heads(lm_width, parsed.heads)
        super().__init__(parsed)
        self.layer_indices = list(range(0, lm_layers, parsed.every))
        self.blocks = torch.nn.ModuleList(GatedBlock(lm_width, encoder_width, parsed.heads)
                                          for _ in self.layer_indices)
        self.marker = torch.nn.Parameter(torch.randn(lm_width) * lm_width ** -0.5)

    def num_tokens(self, encoder_tokens: int) -> int:
        return 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, S, E) -> (N, 1, D): the marker; the features reach the model through :meth:`attach`."""
        return self.marker.expand(features.shape[0], 1, -1)

    @contextmanager
    def attach(self, lm: torch.nn.Module, media: torch.Tensor, missing: torch.Tensor) -> Iterator[None]:
        """Run the gated blocks before their decoder layers while the block is active.

        Args:
            lm: the language model (a peft wrapper is fine).
            media: (B, M, E) the features of each row's inputs, concatenated and padded.
            missing: (B, M) True on padding.
        """
        layers = decoder_layers(lm)
        handles = []
        for block, index in zip(self.blocks, self.layer_indices):

            def hook(module, args, kwargs, block=block):
                if args:
                    return (block(args[0], media, missing), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": block(kwargs["hidden_states"], media, missing)}

            handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
