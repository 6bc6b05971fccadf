"""Tuning methods: how a stage turns its starting model into the model it trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from polm.engine.errors import PolmError


@dataclass
class NoOptions:
    """A tuning method without options."""


class TuningMethod:
    """Base class of tuning methods registered through ``polm_register_tuning_methods``.

    Subclasses set ``Options`` (a dataclass validated like stage options) and
    implement :meth:`prepare`.
    """

    Options: type = NoOptions
    #: False for methods whose result no later stage can build on (virtual tokens cannot be merged).
    mergeable: bool = True

    def check(self, options: Any) -> None:
        """Fail before training if this method cannot run here (e.g. needs a GPU)."""

    def prepare(self, model: torch.nn.Module, options: Any) -> torch.nn.Module:
        """Return the model to train, with ``requires_grad`` set on the trainable parameters."""
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        """Called by the training loop after each optimizer step, before gradients are cleared.

        Args:
            model: the prepared model (unwrapped from Accelerate).
            step: optimizer steps done so far (1 after the first), as in ``metrics.jsonl``.
            total_steps: the steps the stage will take.

        Most methods do nothing here; AdaLoRA reallocates its ranks from the gradients.
        """

    def load_weights(self, model: torch.nn.Module, directory: Path) -> None:
        """Load what ``model.save_pretrained(directory)`` wrote into ``model`` (prepared by this method), in place.

        Called when a run resumes from a checkpoint or a finished stage. Methods whose saved form differs
        from the form they train in override it (AdaLoRA saves only the ranks it kept).
        """
        load_weights(model, directory)


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries peft adapters."""
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model: peft adapters from an earlier stage are merged in.

    Raises:
        PolmError: the adapter adds virtual tokens (prefix or prompt tuning), which no weight can absorb.
    """
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        kind = config.peft_type.value.lower().replace("_", " ")
        raise PolmError(
            f"the previous stage trained {kind}, whose virtual tokens cannot be merged into the weights, so a "
            "later stage cannot tune on top of it; make it the last stage, or train that stage with lora"
        )
    return model.merge_and_unload() if is_peft(model) else model


class FullTuning(TuningMethod):
    """Train every parameter."""

    def prepare(self, model: torch.nn.Module, options: Any) -> torch.nn.Module:
        model = unwrap_peft(model)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model


def tuning_method(options: Any) -> TuningMethod:
    """The registered tuning method a stage's options name (``full`` for stages without a ``tuning`` option)."""
    from polm.engine.plugins import registry

    return registry("tuning_methods").get(getattr(options, "tuning", "full"))


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the weights saved by ``model.save_pretrained(directory)`` into ``model`` in place.

    Handles plain transformers checkpoints (one or several safetensors files;
    tied weights are saved once), peft adapters and media models (which know their own folder layout:
    :meth:`~polm.engine.media.MediaModel.load_saved_weights`). A stage loads through its tuning method
    (:meth:`TuningMethod.load_weights`), which falls back to this.
    """
    from polm.engine.media import MediaModel

    if isinstance(model, MediaModel):
        model.load_saved_weights(Path(directory))
        return
    adapter_file = directory / "adapter_model.safetensors"
    if adapter_file.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter_file))
        return
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise PolmError(f"no model weights (*.safetensors) in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied and not key.endswith("lm_head.weight")]
    if missing or unexpected:
        raise PolmError(
            f"checkpoint {directory} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
