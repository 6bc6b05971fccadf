"""Direct preference optimisation and its relatives: the ``dpo``, ``simpo`` and ``orpo`` stages."""

from polm.plugins.alignment.dpo.objective import Objective, find_objective, pairwise_objectives
from polm.plugins.alignment.dpo.reference import ReferenceModel
from polm.plugins.alignment.dpo.stage import (
    ORPOOptions,
    ORPOStage,
    PreferenceOptions,
    PreferenceStage,
    SimPOOptions,
    SimPOStage,
)

__all__ = [
    "ORPOOptions",
    "ORPOStage",
    "Objective",
    "PreferenceOptions",
    "PreferenceStage",
    "ReferenceModel",
    "SimPOOptions",
    "SimPOStage",
    "find_objective",
    "pairwise_objectives",
]
