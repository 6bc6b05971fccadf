"""AdaLoRA: LoRA in SVD form whose rank budget moves, during training, to the weights that matter.

Zhang et al. 2023, https://arxiv.org/abs/2303.10512. Ranks start at ``init_r`` and the total budget
shrinks on a cubic schedule to ``target_r`` per module between step ``tinit`` and ``total_step - tfinal``;
peft's ``update_and_allocate`` does it after each optimizer step (:meth:`AdaLoraTuning.after_step`).

``total_step`` defaults to the stage's own step count: the stage knows it (``max_steps``, or the
epochs over the encoded data), so asking for it again would invite a mismatch that silently skews
the schedule. peft needs a value when the adapter is built, before that count exists, so polm builds
it with the shortest valid schedule and sets the real count with peft's ``RankAllocator.set_total_step``
at the first step.

Not applied: peft's orthogonality penalty, which it adds to ``outputs.loss`` only when the model
computes the loss from ``labels``; polm stages compute their own losses. Resuming inside an AdaLoRA
stage is not bit-exact: the sensitivity averages are not checkpointed.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.engine.tuning import load_weights
from polm.plugins.finetuning.tuning.base import (
    PeftTuning,
    check_fraction,
    check_positive,
    check_target_option,
)
from polm.plugins.finetuning.tuning.lora import lora_config_kwargs


@dataclass
class AdaLoraOptions:
    """Options of ``adalora``."""

    init_r: int = field(default=12, metadata={"help": "starting rank of every adapted module", "aliases": ("r", "rank")})
    target_r: int = field(default=8, metadata={"help": "average rank per module once the budget has shrunk"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: updates are scaled by alpha / rank",
                                                 "aliases": ("lora_alpha",)})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, in [0, 1)",
                                                  "aliases": ("lora_dropout",)})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "modules to adapt; default as for lora (every projection, or 'all-linear')"}
    )
    total_step: int | None = field(
        default=None, metadata={"help": "steps the rank schedule spans; default: the stage's number of optimizer steps"}
    )
    tinit: int = field(default=0, metadata={"help": "steps at full rank before the budget starts to shrink"})
    tfinal: int = field(default=0, metadata={"help": "steps at the final ranks at the end"})
    delta_t: int = field(default=1, metadata={"help": "steps between two rank reallocations", "aliases": ("deltaT",)})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of its uncertainty"})

    def __post_init__(self) -> None:
        check_positive(self.init_r, "init_r")
        check_positive(self.target_r, "target_r")
        if self.target_r > self.init_r:
            raise ValueError(f"'target_r' ({self.target_r}) must not exceed 'init_r' ({self.init_r})")
        check_positive(self.alpha, "alpha")
        check_fraction(self.dropout, "dropout")
        check_positive(self.delta_t, "delta_t")
        check_fraction(self.beta1, "beta1")
        check_fraction(self.beta2, "beta2")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"'tinit' and 'tfinal' must not be negative, got {self.tinit} and {self.tfinal}")
        if self.total_step is not None and self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"'tinit' + 'tfinal' ({self.tinit} + {self.tfinal}) leave no steps of 'total_step' "
                f"({self.total_step}) to reallocate ranks in; lower them or raise total_step"
            )
        if self.target_modules is not None:
            check_target_option(self.target_modules, "target_modules")


class AdaLoraTuning(PeftTuning):
    """AdaLoRA: rank-adaptive LoRA; see the module docstring."""

    name = "adalora"
    Options = AdaLoraOptions

    def __init__(self) -> None:
        self._derive_total_step: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def peft_config(self, model: torch.nn.Module, options: AdaLoraOptions) -> Any:
        from peft import AdaLoraConfig

        shared = lora_config_kwargs(self.name, model, options)
        return AdaLoraConfig(
            init_r=options.init_r, target_r=options.target_r, tinit=options.tinit, tfinal=options.tfinal,
            deltaT=options.delta_t, beta1=options.beta1, beta2=options.beta2,
            total_step=options.total_step or options.tinit + options.tfinal + 1,  # replaced at the first step
            **shared,
        )

    def prepare(self, model: torch.nn.Module, options: AdaLoraOptions) -> torch.nn.Module:
        model = super().prepare(model, options)
        if options.total_step is None:
            self._derive_total_step.add(model)
        return model

    def after_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        adalora = model.base_model
        config = adalora.peft_config[adalora.trainable_adapter_name]
        if model in self._derive_total_step and config.total_step != total_steps:
            if config.tinit + config.tfinal >= total_steps:
                raise PolmError(
                    f"adalora: 'tinit' + 'tfinal' ({config.tinit} + {config.tfinal}) leave none of the stage's "
                    f"{total_steps} steps to reallocate ranks in; lower them or train longer"
                )
            adalora.rankallocator.set_total_step(total_steps)
        elif step == 1 and config.total_step != total_steps:
            get_logger().warning(
                f"adalora: total_step={config.total_step} but the stage takes {total_steps} steps; "
                "the rank schedule follows total_step (leave it unset to use the stage's steps)"
            )
        adalora.update_and_allocate(step - 1)  # peft counts steps from 0

    def load_weights(self, model: torch.nn.Module, directory: Path) -> None:
        """AdaLoRA saves only the ranks it kept (``rank_pattern``); load them into the full-rank adapter
        ``prepare`` built, and restore the pattern its last phase masks with."""
        saved = json.loads((directory / "adapter_config.json").read_text())
        rank_pattern = saved.get("rank_pattern")
        if not rank_pattern:  # saved before any rank was dropped
            load_weights(model, directory)
            return
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, _at_full_rank(load_file(directory / "adapter_model.safetensors"),
                                                       rank_pattern))
        model.active_peft_config.rank_pattern = rank_pattern


def _at_full_rank(state: dict[str, torch.Tensor], rank_pattern: dict[str, list[bool]]) -> dict[str, torch.Tensor]:
    """The kept ranks put back in place at the initial rank, zeros elsewhere.

    The model being loaded keeps its parameters (an optimizer may hold them) and computes the same
    function: a dropped rank has a zero singular value ``lora_E``.
    """
    for name, kept in rank_pattern.items():
        prefix = "base_model.model." + name[: name.index(".lora_E")]
        positions = torch.tensor(kept).nonzero().flatten()
        for part, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
            saved = state[f"{prefix}.{part}"]
            shape = list(saved.shape)
            shape[dim] = len(kept)
            state[f"{prefix}.{part}"] = saved.new_zeros(shape).index_copy_(dim, positions, saved)
    return state
