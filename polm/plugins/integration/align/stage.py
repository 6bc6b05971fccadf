"""The ``align`` stage: join encoders to the language model and train the connectors on captions.

LLaVA stage 1 (Liu et al. 2023, https://arxiv.org/abs/2304.08485): the
language model and the encoders stay frozen (an encoder with ``freeze: false``
trains too) and only the connectors learn to put encoder features where the
language model can read them. Starting from a text model, the stage builds
the multimodal model from ``encoders`` and ``connectors``; starting from a
multimodal model (a saved folder or an earlier stage), it trains that model's
connectors. A later ``sft`` stage then tunes the language model with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polm.engine.errors import PolmError
from polm.engine.lm import LanguageModellingOptions, LanguageModellingStage
from polm.engine.media import reads_media
from polm.modalities.multimodal.build import build_multimodal


@dataclass
class AlignOptions(LanguageModellingOptions):
    """Options of ``align``: those of a language-modelling stage (without a tuning method) plus the encoders
    and connectors."""

    encoders: dict = field(default_factory=dict, metadata={
        "help": "modality -> encoder: 'open_clip:<arch>' or 'whisper:<size>', or {spec: ..., freeze: false, ...}; "
                "needed when the starting model is a text model"})
    connectors: dict = field(default_factory=dict, metadata={
        "help": "modality -> connector: linear, mlp2x_gelu (default), resampler, cross_attention, "
                "or {name: ..., <options>}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tuning != "full" or self.tuning_options:
            raise ValueError("align trains the connectors with the language model frozen; 'tuning' belongs "
                             "to a later sft stage")


class AlignStage(LanguageModellingStage):
    """Train the connectors (and unfrozen encoders) on image or audio captions; the language model is frozen."""

    Options = AlignOptions

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if not reads_media(model):
            if not self.options.encoders:
                raise PolmError(f"{self.name}: the starting model {type(model).__name__} reads text only; set "
                                "'encoders', e.g. {image: 'open_clip:polm-tiny-vit'}")
            from polm.engine.tuning import unwrap_peft

            model = build_multimodal(unwrap_peft(model), self.options.encoders, self.options.connectors)
        elif self.options.encoders or self.options.connectors:
            raise PolmError(f"{self.name}: the starting model already has encoders "
                            f"({', '.join(model.encoders)}); leave 'encoders' and 'connectors' out")
        return model.freeze_language_model()

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Held-out exact match; a text model (evaluated before the stage builds its encoders) has none."""
        return super().evaluate(model, tokenizer) if reads_media(model) else {}
