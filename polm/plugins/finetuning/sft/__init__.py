"""Supervised fine-tuning."""

from polm.plugins.finetuning.sft.loss import completion_loss
from polm.plugins.finetuning.sft.stage import SFTOptions, SFTStage

__all__ = ["SFTOptions", "SFTStage", "completion_loss"]
