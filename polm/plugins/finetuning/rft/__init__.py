"""Rejection-sampling fine-tuning."""

from polm.plugins.finetuning.rft.stage import RFTOptions, RFTStage

__all__ = ["RFTOptions", "RFTStage"]
