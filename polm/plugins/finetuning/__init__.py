"""The fine-tuning paradigm: SFT and the tuning methods."""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl
from polm.engine.tuning import FullTuning
from polm.plugins.finetuning.sft import SFTStage


@hookimpl
def polm_register_stages(register: Register) -> None:
    register("sft", SFTStage, description="supervised fine-tuning, loss on completions / assistant turns")


@hookimpl
def polm_register_tuning_methods(register: Register) -> None:
    register("full", FullTuning(), description="train every parameter")
