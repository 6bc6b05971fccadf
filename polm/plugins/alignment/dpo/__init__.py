"""Direct preference optimisation and its relatives: the ``dpo``, ``simpo`` and ``orpo`` stages."""

from polm.plugins.alignment.dpo.stage import (
    DPOOptions,
    DPOStage,
    ORPOOptions,
    ORPOStage,
    SimPOOptions,
    SimPOStage,
)

__all__ = [
    "DPOOptions",
    "DPOStage",
    "ORPOOptions",
    "ORPOStage",
    "SimPOOptions",
    "SimPOStage",
]
