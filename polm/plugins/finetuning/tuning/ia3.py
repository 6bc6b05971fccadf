"""(IA)³: learned vectors that rescale keys, values and the MLP's inner activations.

Liu et al. 2022, https://arxiv.org/abs/2205.05638. Far fewer parameters than LoRA (one vector per
adapted layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polm.plugins.finetuning.tuning.base import PeftTuning, check_target_option
from polm.plugins.finetuning.tuning.targets import ALL_LINEAR, check_targets, model_type


@dataclass
class IA3Options:
    """Options of ``ia3``."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "modules whose activations are rescaled; default: peft's choice for the architecture "
                          "(keys, values and the MLP down projection on Llama), 'all-linear' when peft has none"},
    )
    feedforward_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "those of target_modules whose input is rescaled instead of their output (the MLP's "
                          "second layer in the paper); default: peft's choice among the targets, none when peft has none"},
    )

    def __post_init__(self) -> None:
        for option in ("target_modules", "feedforward_modules"):
            if getattr(self, option) is not None:
                check_target_option(getattr(self, option), option)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"'feedforward_modules' must be among 'target_modules'; not there: {', '.join(extra)}")


class IA3Tuning(PeftTuning):
    """(IA)³: train rescaling vectors; the base is frozen."""

    name = "ia3"
    Options = IA3Options

    def peft_config(self, model: torch.nn.Module, options: IA3Options) -> Any:
        from peft import IA3Config
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        )

        known = model_type(model) in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
        # peft's defaults follow the paper per architecture; elsewhere the same shorthand as lora.
        targets = options.target_modules
        if targets is None:
            targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type(model)] if known else ALL_LINEAR
        feedforward = options.feedforward_modules
        if feedforward is None:
            feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type(model)] if known else []
            if not isinstance(targets, str):  # peft wants them among the targets
                feedforward = [name for name in feedforward if name in targets]
        check_targets(self.name, model, targets, "target_modules")
        check_targets(self.name, model, feedforward or None, "feedforward_modules")
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)
