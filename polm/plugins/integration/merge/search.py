"""A small grid search over a merge's weights and density: ``polm merge CONFIG --output DIR --eval DATA --search``.

The grid, for the method the config names:

- ``weight`` (a method with per-model weights): every assignment of 0.3, 0.5 and 0.7 to the models merged; with
  two models or more each assignment is scaled to sum to 1 and those that scaling makes equal are tried once
  (two models: 7 candidates, three: 25); one model keeps the three values as they are;
- ``density`` (ties, dare, della): 0.3, 0.5 and 0.7, the same for every model, times the weights;
- ``t`` (slerp, which has neither): 0.3, 0.5 and 0.7.

A grid of more than :data:`MAX_CANDIDATES` is refused (merge fewer models at a time), and so is a method with
none of the three (``model_stock``). A candidate's values replace the config's own ``weight``, ``density`` or
``t`` (filters and gradients included); every other setting is kept. The base and the inputs are scored once,
then each candidate is merged through :func:`~.merge.merge_models` into a temporary folder beside ``--output``
and scored with the :data:`~.evaluate.Scorer` (by the mean of its figures; the first of equal means wins). The
best stays, the others are deleted as soon as they lose, so at most two candidates are on disk at a time. The
best becomes ``--output`` with ``merge_search.json`` (every candidate's parameters and figures),
``merge_eval.json`` (the inputs and the chosen merge) and a ``search`` entry in ``merge.json``, whose config
holds the chosen values.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from polm.engine.errors import PolmError
from polm.engine.log import progress_bar
from polm.plugins.integration.merge.config import MergeConfig, check_merge_config, merged_models
from polm.plugins.integration.merge.evaluate import (
    DEFAULT_EVAL_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    EvalTask,
    MergeEvaluation,
    ScoredModel,
    Scorer,
    provenance,
    score_inputs,
    score_model,
    scores_table,
    scoring_plan,
)
from polm.plugins.integration.merge.merge import MergeReport, check_output_folder, merge_models
from polm.plugins.integration.merge.writer import RECORD_FILE

#: The values each searched parameter takes.
GRID_VALUES = (0.3, 0.5, 0.7)
#: The most candidates a search tries.
MAX_CANDIDATES = 100
SEARCH_FILE = "merge_search.json"


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: the weight of each model merged, the density, slerp's ``t`` (None: not searched)."""

    weights: tuple[float, ...] | None = None
    density: float | None = None
    t: float | None = None

    def parameters(self) -> dict[str, Any]:
        """``{"weight": [...], "density": ..., "t": ...}``, less what is not searched."""
        values = {"weight": list(self.weights) if self.weights is not None else None, "density": self.density,
                  "t": self.t}
        return {name: value for name, value in values.items() if value is not None}

    def describe(self) -> str:
        """``weight 0.375/0.625, density 0.5``."""
        return ", ".join(f"{name} {'/'.join(f'{v:g}' for v in value) if isinstance(value, list) else f'{value:g}'}"
                         for name, value in self.parameters().items())


def grid_weights(models: int) -> list[tuple[float, ...]]:
    """The weights tried for ``models`` models (see the module docstring), in ``itertools.product`` order."""
    if models == 1:
        return [(value,) for value in GRID_VALUES]
    seen: dict[tuple[float, ...], None] = {}
    for weights in itertools.product(GRID_VALUES, repeat=models):
        seen.setdefault(tuple(round(weight / sum(weights), 4) for weight in weights), None)
    return list(seen)


def search_grid(config: MergeConfig, relative_to: Path | None = None) -> list[Candidate]:
    """The candidates :func:`search_merge` tries for ``config`` (see the module docstring); loads no model.

    Raises:
        PolmError: the method has nothing to search, or the grid is larger than :data:`MAX_CANDIDATES`.
    """
    method = check_merge_config(config, relative_to=relative_to)
    models = len(merged_models(config, method, relative_to))
    weights = grid_weights(models) if "weight" in method.model_parameters else [None]
    densities = GRID_VALUES if "density" in method.model_parameters else (None,)
    ts = GRID_VALUES if "weight" not in method.model_parameters and "t" in method.parameters else (None,)
    grid = [Candidate(w, d, t) for w in weights for d in densities for t in ts]
    if grid == [Candidate()]:
        raise PolmError(f"--search: merge method '{method.name}' has no weight, density or t to search; set its "
                        "parameters in the config and leave out --search")
    if len(grid) > MAX_CANDIDATES:
        raise PolmError(f"--search: {len(grid)} candidates for {models} models is more than the {MAX_CANDIDATES} "
                        "a search tries; merge fewer models at a time, or set their weights in the config")
    return grid


def describe_grid(config: MergeConfig, grid: Sequence[Candidate]) -> str:
    """``21 candidates (weight in 0.3, 0.5, 0.7 per model, scaled to sum to 1; density in 0.3, 0.5, 0.7)``."""
    values = ", ".join(f"{value:g}" for value in GRID_VALUES)
    parts = []
    if grid[0].weights is not None:
        scaled = ", scaled to sum to 1" if len(grid[0].weights) > 1 else ""
        parts.append(f"weight in {values} per model{scaled}")
    parts += [f"{name} in {values}" for name in ("density", "t") if getattr(grid[0], name) is not None]
    return f"{len(grid)} candidate{'s' if len(grid) != 1 else ''} ({'; '.join(parts)})"


def candidate_config(config: MergeConfig, candidate: Candidate, relative_to: Path | None = None) -> MergeConfig:
    """``config`` with the candidate's values: each merged model's ``weight`` and ``density``, the top-level
    ``t``; the top-level ``weight`` and ``density`` (defaults the models no longer use) dropped."""
    method = check_merge_config(config, relative_to=relative_to)
    merged = [id(entry) for entry in merged_models(config, method, relative_to)]  # the config's own entries
    per_model = {"density": candidate.density} if candidate.density is not None else {}
    models = []
    for entry in config.models:
        if id(entry) in merged and (candidate.weights is not None or per_model):
            parameters = {**(entry.get("parameters") or {}), **per_model}
            if candidate.weights is not None:
                parameters["weight"] = candidate.weights[merged.index(id(entry))]
            entry = {**entry, "parameters": parameters}
        models.append(entry)
    parameters = {name: value for name, value in config.parameters.items()
                  if not (name == "weight" and candidate.weights is not None)
                  and not (name == "density" and candidate.density is not None)}
    if candidate.t is not None:
        parameters["t"] = candidate.t
    return dataclasses.replace(config, models=models, parameters=parameters)


@dataclass
class SearchResult:
    """What :func:`search_merge` found: every candidate with its figures, the index of the chosen one, and the
    :class:`~.evaluate.MergeEvaluation` of the inputs and the chosen merge (its ``report`` the merge's)."""

    candidates: list[Candidate]
    scores: list[ScoredModel]
    chosen: int
    evaluation: MergeEvaluation

    @property
    def report(self) -> MergeReport:
        return self.evaluation.report

    def table(self) -> Table:
        """A row per candidate: its values, its figures and their mean; the chosen one in bold."""
        names = list(self.candidates[0].parameters())
        leading = [("#", [str(index) for index in range(1, len(self.candidates) + 1)])]
        leading += [(name, [_value(candidate.parameters()[name]) for candidate in self.candidates])
                    for name in names]
        return scores_table(self.scores, self.evaluation.columns(),
                            f"polm merge --search: {self.evaluation.metric}, {len(self.candidates)} candidates",
                            leading, self.chosen)

    def document(self) -> dict[str, Any]:
        """What ``merge_search.json`` holds: the grid, each candidate's parameters and figures, the chosen one
        (numbered from 1, as the table numbers them) and the inputs' figures."""
        return {**provenance(), "metric": self.evaluation.metric, "settings": self.evaluation.settings,
                "grid": {"values": list(GRID_VALUES), "parameters": list(self.candidates[0].parameters()),
                         "weights_scaled_to_sum_1": len(self.candidates[0].weights or ()) > 1},
                "chosen": self.chosen + 1, "chosen_parameters": self.candidates[self.chosen].parameters(),
                "candidates": [{"candidate": index, "parameters": candidate.parameters(), "scores": scored.scores,
                                "mean": scored.mean}
                               for index, (candidate, scored) in enumerate(zip(self.candidates, self.scores),
                                                                           start=1)],
                "inputs": [row.as_dict() for row in self.evaluation.rows if row.label != "merge"]}


def _value(value: Any) -> str:
    return " / ".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def search_merge(config: MergeConfig, output: str | Path, tasks: Sequence[str | EvalTask] = (), *,
                 scorer: Scorer | None = None, grid: Sequence[Candidate] | None = None,
                 eval_size: int = DEFAULT_EVAL_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 relative_to: Path | None = None, seed: int = 0, dtype: str | None = None,
                 show_progress: bool = False) -> SearchResult:
    """Try each candidate of ``grid`` (default :func:`search_grid`), write the best by the scorer's mean to
    ``output`` with ``merge_search.json`` and ``merge_eval.json``, and record the choice in its ``merge.json``.

    Args:
        tasks, scorer, eval_size, max_new_tokens: what the candidates are scored with, as
            :func:`~.evaluate.evaluate_merge` takes them.
        relative_to, seed, dtype: as :func:`~.merge.merge_models` takes them; every candidate has the same seed.
        show_progress: a progress bar over the candidates.

    Raises:
        PolmError: before anything is loaded or written, for an output folder that holds something, bad tasks,
            or a grid :func:`search_grid` refuses; then as ``merge_models`` and the scorer raise.
    """
    output = Path(output)
    check_output_folder(output)
    plan = scoring_plan(tasks, scorer, eval_size=eval_size, max_new_tokens=max_new_tokens)
    grid = list(grid) if grid is not None else search_grid(config, relative_to)
    inputs = score_inputs(config, plan.scorer, relative_to)
    output.parent.mkdir(parents=True, exist_ok=True)
    scores: list[ScoredModel] = []
    chosen, chosen_report = 0, None
    progress = progress_bar("search", show_progress)
    # Beside the output, so that the chosen folder becomes the output by a rename; named as the output inside
    # (the model card's title is the folder's name).
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.search-") as work, progress:
        task = progress.add_task("search", total=len(grid))
        for index, candidate in enumerate(grid):
            folder = Path(work) / str(index) / output.name
            report = merge_models(candidate_config(config, candidate, relative_to), folder, relative_to=relative_to,
                                  seed=seed, dtype=dtype)
            scores.append(ScoredModel(f"candidate {index + 1}", candidate.describe(),
                                      score_model(plan.scorer, str(folder))))
            if chosen_report is None or scores[-1].mean > scores[chosen].mean:
                if chosen_report is not None:
                    shutil.rmtree(chosen_report.output.parent)
                chosen, chosen_report = index, report
            else:
                shutil.rmtree(folder.parent)
            progress.advance(task)
        report = dataclasses.replace(chosen_report, output=output)
        best = ScoredModel("merge", str(output), scores[chosen].scores)
        result = SearchResult(grid, scores, chosen, MergeEvaluation([*inputs, best], plan.metric, plan.settings,
                                                                    report))
        folder = chosen_report.output
        _record_choice(folder, result)
        result.evaluation.write(folder)
        (folder / SEARCH_FILE).write_text(json.dumps(result.document(), indent=2) + "\n")
        check_output_folder(output)  # still empty: nothing is overwritten
        if output.is_dir():
            output.rmdir()
        os.replace(folder, output)
    return result


def _record_choice(folder: Path, result: SearchResult) -> None:
    """Add the search to the chosen merge's ``merge.json`` (its config already holds the chosen values)."""
    path = folder / RECORD_FILE
    record = json.loads(path.read_text())
    record["search"] = {"parameters": result.candidates[result.chosen].parameters(),
                        "mean": result.scores[result.chosen].mean, "metric": result.evaluation.metric,
                        "candidate": result.chosen + 1, "candidates": len(result.candidates), "table": SEARCH_FILE}
    result.report.record.update(search=record["search"])
    path.write_text(json.dumps(record, indent=2) + "\n")
