"""Prefix and prompt tuning: trained virtual tokens in front of every sequence; the model is frozen.

Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) trains keys and values that every
layer attends to; prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691) trains input
embeddings only. peft extends the attention mask and the labels by the virtual tokens itself.

Two adjustments make the ``PeftModel`` behave like the model it wraps:

* Prompt tuning returns logits for the virtual tokens too, ``(B, n + T, V)``. Stages compute their
  losses from logits aligned with ``input_ids``, so a forward hook drops the first ``n``.
* With transformers 5, ``generate`` passes the KV cache as ``cache``, where peft 0.21 looks for
  ``past_key_values``: prefix tuning then generates without its prefix, and prompt tuning inserts
  its prompt again at every new token. :func:`fix_generation` renames the key for peft.
* peft drops ``position_ids`` for prompt tuning, so in a left-padded batch the padding sits between
  the virtual tokens and the text and shifts their rotary distance. :func:`fix_generation` numbers
  positions from the attention mask, as ``generate`` does for plain models.

A saved prefix or prompt adapter needs the fix too when it is loaded again, so the fine-tuning plugin
claims such folders through ``polm_load_model`` (:func:`load_virtual_token_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polm.engine.errors import PolmError
from polm.plugins.finetuning.tuning.base import PeftTuning, check_positive


@dataclass
class PrefixOptions:
    """Options of ``prefix``."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "trained key/value positions per layer"})
    projection: bool = field(
        default=False, metadata={"help": "produce the prefix with a two-layer MLP (more stable, more parameters)"}
    )
    projection_size: int | None = field(
        default=None, metadata={"help": "hidden width of that MLP; default: the model's hidden size"}
    )

    def __post_init__(self) -> None:
        check_positive(self.num_virtual_tokens, "num_virtual_tokens")
        if self.projection_size is not None:
            check_positive(self.projection_size, "projection_size")
            if not self.projection:
                raise ValueError("'projection_size' needs 'projection: true'")


@dataclass
class PromptOptions:
    """Options of ``prompt``."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "trained input embeddings put before the text"})
    init_text: str | None = field(
        default=None,
        metadata={"help": "start from the embeddings of this text (repeated or cut to num_virtual_tokens); "
                          "default: embeddings of random vocabulary tokens"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "folder or hub id of the tokenizer for init_text; default: where the model was loaded from"},
    )

    def __post_init__(self) -> None:
        check_positive(self.num_virtual_tokens, "num_virtual_tokens")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("'init_text' must not be empty")
        if self.tokenizer is not None and self.init_text is None:
            raise ValueError("'tokenizer' is only used with 'init_text'")


class VirtualTokenTuning(PeftTuning):
    """Shared by prefix and prompt tuning: the generation fix."""

    mergeable = False

    def prepare(self, model: torch.nn.Module, options: Any) -> torch.nn.Module:
        model = super().prepare(model, options)
        fix_generation(model)
        return model


class PrefixTuning(VirtualTokenTuning):
    """Prefix tuning: train ``num_virtual_tokens`` keys and values for every layer."""

    name = "prefix"
    Options = PrefixOptions

    def peft_config(self, model: torch.nn.Module, options: PrefixOptions) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.projection, encoder_hidden_size=options.projection_size,
        )


class PromptTuning(VirtualTokenTuning):
    """Prompt tuning: train ``num_virtual_tokens`` input embeddings."""

    name = "prompt"
    Options = PromptOptions

    def peft_config(self, model: torch.nn.Module, options: PromptOptions) -> Any:
        from peft import PromptTuningConfig

        if options.init_text is None:
            # Real token embeddings start on the scale the model expects, unlike peft's N(0, 1) default.
            return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens,
                                      prompt_tuning_init="SAMPLE_VOCAB")
        tokenizer = options.tokenizer or getattr(model, "name_or_path", None)
        if not tokenizer:
            raise PolmError(
                "prompt: 'init_text' needs a tokenizer peft can load; set the tuning option 'tokenizer' to its "
                "folder (the model was given as an object, so polm does not know where it came from)"
            )
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens, prompt_tuning_init="TEXT",
            prompt_tuning_init_text=options.init_text, tokenizer_name_or_path=str(tokenizer),
        )

    def prepare(self, model: torch.nn.Module, options: PromptOptions) -> torch.nn.Module:
        try:
            model = super().prepare(model, options)
        except OSError as error:  # the tokenizer for init_text did not load
            raise PolmError(f"prompt: could not load the tokenizer for 'init_text': {str(error).splitlines()[0]}") from None
        model.register_forward_hook(_drop_virtual_token_logits, with_kwargs=True)
        return model


def _drop_virtual_token_logits(model: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Logits for the input positions only: ``(B, n + T, V) -> (B, T, V)``."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    length = tokens.shape[1]
    if output.logits.shape[1] > length:
        output.logits = output.logits[:, -length:]
    return output


def fix_generation(model: torch.nn.Module) -> None:
    """Make peft's prefix / prompt tuning generate correctly with transformers 5 (see the module docstring).

    peft's step preparation sees the cache as ``past_key_values`` and the model gets it back as
    ``cache``; nothing changes where the model still calls it ``past_key_values``.
    """
    from peft import PeftType

    peft_prepare = model.prepare_inputs_for_generation
    base_prepare = model.base_model_prepare_inputs_for_generation
    virtual_inputs = model.active_peft_config.peft_type == PeftType.PROMPT_TUNING
    renamed = False

    def base_prepare_for_peft(*args: Any, **kwargs: Any) -> dict[str, Any]:
        nonlocal renamed
        inputs = base_prepare(*args, **kwargs)
        renamed = "cache" in inputs
        if renamed:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def prepare_inputs(*args: Any, **kwargs: Any) -> dict[str, Any]:
        model.base_model_prepare_inputs_for_generation = base_prepare_for_peft
        try:
            inputs = peft_prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if renamed and "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        mask = inputs.get("attention_mask")  # peft has put the virtual tokens' ones in front
        if virtual_inputs and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            step = inputs["inputs_embeds"] if inputs.get("inputs_embeds") is not None else inputs["input_ids"]
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -step.shape[1]:]  # (B, T)
        return inputs

    # peft's generate installs the model's prepare_inputs_for_generation on the base model for the call.
    model.prepare_inputs_for_generation = prepare_inputs


def is_virtual_token_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a peft prompt-learning adapter (prefix, prompt or p-tuning)."""
    if not (folder / "adapter_config.json").is_file():
        return False
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(folder)).is_prompt_learning


def load_virtual_token_adapter(folder: Path, tokenizer: Any = None) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of a saved prefix or prompt adapter, with its base and the generation fix.

    Raises:
        OSError: the base model or the tokenizer cannot be loaded (``load_model`` reports it).
    """
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    fix_generation(model)
    return model, tokenizer or AutoTokenizer.from_pretrained(str(folder))
