"""Pruning: unstructured sparsity (magnitude, Wanda) and structured removal of MLP neurons and attention heads.

``methods`` holds the scores and masks as pure functions over tensors, ``calibration`` the input statistics
of Linear layers on a few rows, ``structured`` the in-place shrinking of a transformers decoder, and ``stage``
the ``prune`` stage, which prunes and optionally fine-tunes to recover with the zeros kept.
"""

from polm.plugins.efficiency.prune.calibration import InputStatistics, collect_input_statistics
from polm.plugins.efficiency.prune.methods import (
    global_masks,
    head_importance,
    heads_to_keep,
    layer_mask,
    magnitude_scores,
    neuron_importance,
    neurons_to_keep,
    wanda_scores,
)
from polm.plugins.efficiency.prune.stage import PruneMasks, PruneOptions, PruneStage, pruning_metrics
from polm.plugins.efficiency.prune.structured import (
    StructuredPlan,
    decoder_linears,
    prune_structured,
    shrink_attention,
    shrink_mlp,
    structured_plan,
)

__all__ = ["InputStatistics", "PruneMasks", "PruneOptions", "PruneStage", "StructuredPlan", "collect_input_statistics",
           "decoder_linears", "global_masks", "head_importance", "heads_to_keep", "layer_mask", "magnitude_scores",
           "neuron_importance", "neurons_to_keep", "prune_structured", "pruning_metrics", "shrink_attention",
           "shrink_mlp", "structured_plan", "wanda_scores"]
