"""The ``prm`` reward: a completion scored by a process reward model, step by step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from polm.plugins.reasoning.prm.model import load_process_reward_model, step_scores

AGGREGATIONS = ("min", "prod")
_loaded: dict[tuple[str, float], tuple[Any, Any]] = {}


def _cached(checkpoint: str) -> tuple[Any, Any]:
    """The PRM at ``checkpoint``, loaded once per version of its weights."""
    path = Path(checkpoint)
    folder = path / "final" if (path / "final").is_dir() else path
    stamp = max((file.stat().st_mtime for file in folder.glob("*.safetensors")), default=0.0)
    key = (str(folder.resolve()), stamp)
    if key not in _loaded:
        _loaded.clear()  # keep one PRM in memory
        _loaded[key] = load_process_reward_model(folder)
    return _loaded[key]


def prm_reward(prompts: list[Any], completions: list[str], checkpoint: str | None = None, aggregation: str = "min",
               separator: str = "\n", **fields: Any) -> list[float]:
    """The PRM's score of each completion: the ``min`` or ``prod`` of its steps' P(right), 0.0 without steps.

    Steps are the lines of the ``<think>`` block and the ``<answer>`` block
    (see :func:`~polm.plugins.reasoning.prm.steps.step_spans`).
    ``min`` is the first-error view of Lightman et al. 2023; ``prod`` treats steps as independent checks.
    """
    if checkpoint is None:
        raise ValueError("the prm reward needs the PRM: set reward_options {prm: {checkpoint: <folder of a prm stage>}}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    model, tokenizer = _cached(checkpoint)
    scores = step_scores(model, tokenizer, prompts, completions, separator=separator)
    combine = min if aggregation == "min" else math.prod
    return [combine(values) if values else 0.0 for values in scores]
