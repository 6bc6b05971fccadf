"""Tuning methods: which parameters a stage trains, through peft wherever peft has the method.

``full`` (every parameter) lives in :mod:`polm.engine.tuning`, the engine's default.
"""

from polm.plugins.finetuning.tuning.adalora import AdaLoraOptions, AdaLoraTuning
from polm.plugins.finetuning.tuning.base import PeftTuning
from polm.plugins.finetuning.tuning.freeze import FreezeOptions, FreezeTuning
from polm.plugins.finetuning.tuning.ia3 import IA3Options, IA3Tuning
from polm.plugins.finetuning.tuning.lora import DoraTuning, LoraOptions, LoraTuning
from polm.plugins.finetuning.tuning.qlora import QLoraOptions, QLoraTuning
from polm.plugins.finetuning.tuning.targets import LORA_TARGETS, default_lora_targets
from polm.plugins.finetuning.tuning.virtual_tokens import (
    PrefixOptions,
    PrefixTuning,
    PromptOptions,
    PromptTuning,
    fix_generation,
)

__all__ = [
    "LORA_TARGETS",
    "AdaLoraOptions",
    "AdaLoraTuning",
    "DoraTuning",
    "FreezeOptions",
    "FreezeTuning",
    "IA3Options",
    "IA3Tuning",
    "LoraOptions",
    "LoraTuning",
    "PeftTuning",
    "PrefixOptions",
    "PrefixTuning",
    "PromptOptions",
    "PromptTuning",
    "QLoraOptions",
    "QLoraTuning",
    "default_lora_targets",
    "fix_generation",
]
