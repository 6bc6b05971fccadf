"""Online DPO: the ``online_dpo`` stage."""

from polm.plugins.alignment.online_dpo.stage import OnlineDPOOptions, OnlineDPOStage

__all__ = ["OnlineDPOOptions", "OnlineDPOStage"]
