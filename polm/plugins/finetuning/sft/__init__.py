"""Supervised fine-tuning."""

from polm.plugins.finetuning.sft.loss import completion_loss
from polm.plugins.finetuning.sft.stage import SFTOptions, SFTStage, sft_loss

__all__ = ["SFTOptions", "SFTStage", "completion_loss", "sft_loss"]
