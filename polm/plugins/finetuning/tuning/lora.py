"""LoRA and DoRA: low-rank updates of the base weights, trained while the base stays frozen.

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685 (rsLoRA scaling: Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732). DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polm.engine.errors import PolmError
from polm.plugins.finetuning.tuning.base import (
    PeftTuning,
    check_fraction,
    check_positive,
    check_target_option,
)
from polm.plugins.finetuning.tuning.targets import (
    check_targets,
    default_lora_targets,
    fused_expert_parameters,
)

BIAS = ("none", "all", "lora_only")
EXPERTS = ("adapt", "freeze")


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
    experts: str = field(default="adapt", metadata={
        "help": "the routed experts of a mixture-of-experts model, whose weights are fused 3-d parameters: adapt "
                "(LoRA on each expert's matrices, peft's target_parameters; needs dropout 0) or freeze. Routers "
                "are never adapted by default"})

    def __post_init__(self) -> None:
        check_positive(self.r, "r")
        check_positive(self.alpha, "alpha")
        check_fraction(self.dropout, "dropout")
        if self.bias not in BIAS:
            raise ValueError(f"'bias' must be one of {', '.join(BIAS)}, got '{self.bias}'")
        if self.experts not in EXPERTS:
            raise ValueError(f"'experts' must be one of {', '.join(EXPERTS)}, got '{self.experts}'")
        if self.target_modules is not None:
            check_target_option(self.target_modules, "target_modules")
        if self.modules_to_save is not None:
            check_target_option(self.modules_to_save, "modules_to_save")


def lora_config_kwargs(method: str, model: torch.nn.Module, options: Any) -> dict[str, Any]:
    """The ``LoraConfig`` arguments LoRA-style methods share, targets checked against ``model``.

    ``options`` has ``alpha``, ``dropout`` and ``target_modules``; ``bias``, ``use_rslora``,
    ``modules_to_save`` and ``experts`` where the method offers them (without ``experts`` the routed
    experts of an MoE model stay frozen).

    Raises:
        PolmError: a target matches no module, or the experts are to be adapted with dropout.
    """
    targets = options.target_modules if options.target_modules is not None else default_lora_targets(model)
    modules_to_save = getattr(options, "modules_to_save", None)
    check_targets(method, model, targets, "target_modules")
    check_targets(method, model, modules_to_save, "modules_to_save")
    experts = fused_expert_parameters(model) if getattr(options, "experts", "freeze") == "adapt" else []
    if experts and options.dropout:
        raise PolmError(f"{method}: the routed experts of {type(model).__name__} are fused parameters, which peft "
                        f"adapts only without dropout; set dropout: 0, or experts: freeze to leave them out")
    return {
        "task_type": "CAUSAL_LM",
        "lora_alpha": options.alpha,
        "lora_dropout": options.dropout,
        "target_modules": targets,
        "bias": getattr(options, "bias", "none"),
        "use_rslora": getattr(options, "use_rslora", False),
        "modules_to_save": modules_to_save,
        **({"target_parameters": experts} if experts else {}),
    }


class LoraTuning(PeftTuning):
    """LoRA: train ``B @ A`` (rank ``r``) added to each target weight; the base is frozen."""

    name = "lora"
    Options = LoraOptions
    use_dora = False

    def peft_config(self, model: torch.nn.Module, options: LoraOptions) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=options.r, use_dora=self.use_dora, **lora_config_kwargs(self.name, model, options))


@dataclass
class DoraOptions(LoraOptions):
    """Options of ``dora``: those of ``lora``, the routed experts of an MoE model frozen (peft has no DoRA for
    fused parameters)."""

    experts: str = field(default="freeze", metadata={
        "help": "the routed experts of a mixture-of-experts model: freeze (peft has no DoRA for their fused "
                "weights; use lora to adapt them)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.experts != "freeze":
            raise ValueError("'experts' must be freeze for dora: peft has no DoRA for fused expert weights; "
                             "use the lora method to adapt the experts")


class DoraTuning(LoraTuning):
    """DoRA: LoRA on the direction of each weight plus a trained magnitude vector."""

    name = "dora"
    Options = DoraOptions
    use_dora = True
