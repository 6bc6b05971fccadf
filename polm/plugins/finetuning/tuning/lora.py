"""LoRA and DoRA: low-rank updates of the base weights, trained while the base stays frozen.

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685 (rsLoRA scaling: Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732). DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polm.plugins.finetuning.tuning.base import (
    PeftTuning,
    check_fraction,
    check_positive,
    check_target_option,
)
from polm.plugins.finetuning.tuning.targets import check_targets, default_lora_targets

BIAS = ("none", "all", "lora_only")


@dataclass
class LoraOptions:
    """Options of ``lora`` and ``dora``."""

    r: int = field(default=8, metadata={"help": "rank of the update matrices", "aliases": ("rank", "lora_r")})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: updates are scaled by alpha / r",
                                                 "aliases": ("lora_alpha",)})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, in [0, 1)",
                                                  "aliases": ("lora_dropout",)})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "modules to adapt: names (a module matches its name or a '.name' suffix), a regular "
                          "expression, or 'all-linear'; default: every attention and MLP projection for Llama, Qwen2, "
                          "Mistral and GPT-2, 'all-linear' for other architectures"},
    )
    bias: str = field(default="none", metadata={"help": "biases to train too: none, all (every bias) or lora_only"})
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r) (rank-stabilised LoRA)"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full and saved with the adapter (e.g. ['lm_head'])"}
    )

    def __post_init__(self) -> None:
        check_positive(self.r, "r")
        check_positive(self.alpha, "alpha")
        check_fraction(self.dropout, "dropout")
        if self.bias not in BIAS:
            raise ValueError(f"'bias' must be one of {', '.join(BIAS)}, got '{self.bias}'")
        if self.target_modules is not None:
            check_target_option(self.target_modules, "target_modules")
        if self.modules_to_save is not None:
            check_target_option(self.modules_to_save, "modules_to_save")


def lora_config_kwargs(method: str, model: torch.nn.Module, options: Any) -> dict[str, Any]:
    """The ``LoraConfig`` arguments LoRA-style methods share, targets checked against ``model``.

    ``options`` has ``alpha``, ``dropout`` and ``target_modules``; ``bias``, ``use_rslora`` and
    ``modules_to_save`` where the method offers them.
    """
    targets = options.target_modules if options.target_modules is not None else default_lora_targets(model)
    modules_to_save = getattr(options, "modules_to_save", None)
    check_targets(method, model, targets, "target_modules")
    check_targets(method, model, modules_to_save, "modules_to_save")
    return {
        "task_type": "CAUSAL_LM",
        "lora_alpha": options.alpha,
        "lora_dropout": options.dropout,
        "target_modules": targets,
        "bias": getattr(options, "bias", "none"),
        "use_rslora": getattr(options, "use_rslora", False),
        "modules_to_save": modules_to_save,
    }


class LoraTuning(PeftTuning):
    """LoRA: train ``B @ A`` (rank ``r``) added to each target weight; the base is frozen."""

    name = "lora"
    Options = LoraOptions
    use_dora = False

    def peft_config(self, model: torch.nn.Module, options: LoraOptions) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=options.r, use_dora=self.use_dora, **lora_config_kwargs(self.name, model, options))


class DoraTuning(LoraTuning):
    """DoRA: LoRA on the direction of each weight plus a trained magnitude vector."""

    name = "dora"
    use_dora = True
