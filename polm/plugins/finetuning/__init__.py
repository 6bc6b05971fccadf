"""The fine-tuning paradigm: SFT, rejection-sampling fine-tuning, the tuning methods, and the
language-modelling objective ``completion`` that ``sft`` and ``align`` train with by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polm.engine.hookspecs import Register, hookimpl
from polm.engine.lm import completion_loss
from polm.engine.objectives import LANGUAGE_MODELLING
from polm.engine.tuning import FullTuning
from polm.plugins.finetuning.rft import RFTStage
from polm.plugins.finetuning.sft import SFTStage
from polm.plugins.finetuning.tuning import (
    AdaLoraTuning,
    DoraTuning,
    FreezeTuning,
    IA3Tuning,
    LoraTuning,
    PrefixTuning,
    PromptTuning,
    QLoraTuning,
)
from polm.plugins.finetuning.tuning.virtual_tokens import is_virtual_token_adapter, load_virtual_token_adapter


@hookimpl
def polm_register_stages(register: Register) -> None:
    register("sft", SFTStage, description="supervised fine-tuning, loss on completions / assistant turns")
    register("rft", RFTStage, description="rejection-sampling fine-tuning: keep samples a reward accepts, train")


@hookimpl
def polm_register_objectives(register: Register) -> None:
    register("completion", completion_loss, family=LANGUAGE_MODELLING,
             description="next-token cross-entropy on completion / assistant tokens, prompts masked")


@hookimpl
def polm_register_tuning_methods(register: Register) -> None:
    register("full", FullTuning(), description="train every parameter")
    register("freeze", FreezeTuning(), description="train the named modules or the last layers, freeze the rest")
    register("lora", LoraTuning(), description="low-rank adapters on a frozen base (peft)")
    register("dora", DoraTuning(), description="LoRA split into magnitude and direction (peft)")
    register("qlora", QLoraTuning(), description="LoRA on a 4-bit base; needs a CUDA GPU and bitsandbytes (peft)")
    register("adalora", AdaLoraTuning(), description="LoRA whose ranks move to the weights that matter (peft)")
    register("ia3", IA3Tuning(), description="learned rescaling of keys, values and MLP activations (peft)")
    register("prefix", PrefixTuning(), description="trained keys and values before every sequence (peft)")
    register("prompt", PromptTuning(), description="trained input embeddings before every sequence (peft)")


@hookimpl
def polm_load_model(path: Path, tokenizer: Any) -> tuple[torch.nn.Module, Any] | None:
    """A saved prefix or prompt adapter loads with peft and polm's generation fix; other folders are not ours."""
    return load_virtual_token_adapter(path, tokenizer) if is_virtual_token_adapter(path) else None
