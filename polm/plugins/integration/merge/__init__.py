"""``merge``: combining the weights of several models that share an architecture into one (mergekit's methods).

The merge methods themselves are pure functions over tensors in :mod:`.methods`, registered through
``polm_register_merge_methods``; reading a merge config and the model files around them lives beside them:

- :mod:`.config`: the merge config (mergekit's YAML keys) read and checked against its method before any
  model loads (:func:`read_merge_config`, :func:`check_merge_config`, :func:`find_merge_method`);
- :mod:`.parameters`: a parameter's value for one tensor (scalars, gradients over the layers, name filters);
- :mod:`.inputs`: each model resolved to a :class:`MergeInput` read tensor by tensor, and the checks that the
  inputs match (:func:`check_compatible`); another kind of input adds a reader to :data:`INPUT_READERS`;
- :mod:`.merge`: :func:`merge_models`, tensor by tensor into an atomically written folder;
- :mod:`.writer`: the transformers folder, ``merge.json`` and the model card;
- :mod:`.lora`: LoRA adapters (:class:`LoraAdapter`) merged into their base or into a new adapter (``lora``);
- :mod:`.multimodal`: polm multimodal models (language model, connectors, encoders) read and written as one input;
- :mod:`.evaluate`: the base, the models and the merge scored on held-out data (``--eval``), one table;
- :mod:`.search`: a grid of weights and density tried against that score (``--search``), the best kept;
- :mod:`.command` (``polm merge CONFIG --output DIR``) and :mod:`.stage` (the ``merge`` stage).
"""

from polm.plugins.integration.merge.command import MERGE_COMMAND
from polm.plugins.integration.merge.config import (
    LoraMerge,
    MergeConfig,
    MergeMethod,
    check_merge_config,
    find_merge_method,
    merged_models,
    read_merge_config,
)
from polm.plugins.integration.merge.evaluate import (
    EvalTask,
    MergeEvaluation,
    Scorer,
    eval_tasks,
    evaluate_merge,
    exact_match_scorer,
)
from polm.plugins.integration.merge.inputs import (
    INPUT_READERS,
    MergeInput,
    SafetensorsFolder,
    check_compatible,
    model_input,
    open_input,
)
from polm.plugins.integration.merge.lora import LoraAdapter
from polm.plugins.integration.merge.merge import MergeReport, merge_models, plan_tensors, resolve_keywords
from polm.plugins.integration.merge.multimodal import MultimodalFolder
from polm.plugins.integration.merge.parameters import evaluate_setting, layer_position
from polm.plugins.integration.merge.search import Candidate, SearchResult, search_grid, search_merge
from polm.plugins.integration.merge.stage import MergeStage

__all__ = ["INPUT_READERS", "MERGE_COMMAND", "Candidate", "EvalTask", "LoraAdapter", "LoraMerge", "MergeConfig",
           "MergeEvaluation", "MergeInput",
           "MergeMethod", "MergeReport", "MergeStage", "MultimodalFolder", "SafetensorsFolder", "Scorer",
           "SearchResult",
           "check_compatible", "check_merge_config", "eval_tasks", "evaluate_merge", "evaluate_setting",
           "exact_match_scorer", "find_merge_method", "layer_position", "merge_models", "merged_models",
           "model_input", "open_input", "plan_tensors", "read_merge_config", "resolve_keywords", "search_grid",
           "search_merge"]
