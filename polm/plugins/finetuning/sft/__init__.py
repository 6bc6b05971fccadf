"""Supervised fine-tuning."""

from polm.plugins.finetuning.sft.stage import SFTOptions, SFTStage

__all__ = ["SFTOptions", "SFTStage"]
