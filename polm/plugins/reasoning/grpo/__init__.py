"""GRPO and its variants (Dr. GRPO, DAPO, RLOO advantages)."""

from polm.plugins.reasoning.grpo.options import GRPOOptions
from polm.plugins.reasoning.grpo.stage import GRPOStage

__all__ = ["GRPOOptions", "GRPOStage"]
