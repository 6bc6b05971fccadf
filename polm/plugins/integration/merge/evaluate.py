"""Scoring a merge against its inputs: ``polm merge CONFIG --output DIR --eval DATA [--eval DATA ...]``.

Each ``--eval`` dataset is a task: its ``test`` split for a bundled one (``polm:arithmetic``), the file (or
``save_to_disk`` folder) as given otherwise, its first ``--eval-size`` rows. The base (when the config names
one), each model merged and the merged model are scored on every task, and the figures are printed as one
table (a row per model, a column per task and their mean) and written to ``merge_eval.json`` beside
``merge.json``.

The scoring is a hook: a :data:`Scorer` is any callable from a model to its figures, higher being better. The
default, :func:`exact_match_scorer`, is greedy ``exact_match`` of :func:`polm.evaluate` on each task; the
Python API takes another one::

    from polm.plugins.integration.merge import evaluate_merge, read_merge_config

    def shortest_answers(model: str) -> dict[str, float]:   # a folder, a registered name or a hub id
        ...
        return {"brevity": score}

    evaluation = evaluate_merge(read_merge_config("merge.yaml"), "merged", scorer=shortest_answers)

:mod:`.search` ranks candidate merges with the same scorer (by the mean of its figures).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from polm.engine.data import Row, bundled_name, check_data_spec, load_rows
from polm.engine.errors import PolmError
from polm.engine.evaluation import graded_rows
from polm.engine.log import get_logger
from polm.plugins.integration.merge.config import MergeConfig, check_merge_config, merged_models
from polm.plugins.integration.merge.inputs import local_path
from polm.plugins.integration.merge.merge import MergeReport, check_output_folder, merge_models

#: A model (anything :func:`polm.load_model` takes: a folder, a registered name, a hub id) -> its figures,
#: ``{name: score}``, higher being better; their mean ranks :mod:`.search`'s candidates.
Scorer = Callable[[str], Mapping[str, float]]
EVAL_FILE = "merge_eval.json"
EVAL_SPLIT = "test"
DEFAULT_EVAL_SIZE = 300
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class EvalTask:
    """One ``--eval`` dataset: its column name in the table, the spec as given and its held-out rows."""

    name: str
    data: str
    rows: list[Row] = field(repr=False)


def eval_tasks(specs: Sequence[str], size: int = DEFAULT_EVAL_SIZE) -> list[EvalTask]:
    """The tasks of ``--eval`` specs: each read now (its ``test`` split, or the file as given), cut to ``size``
    rows, and named after the bundled dataset or the file's stem (the spec itself where two stems clash).

    Raises:
        PolmError: one line naming the spec: no specs, a spec given twice, an unknown dataset, a missing file,
            rows that do not read, or none with an answer to grade against; or ``size`` below 1.
    """
    if not specs:
        raise PolmError("--eval: give at least one dataset, e.g. --eval polm:arithmetic")
    if size < 1:
        raise PolmError(f"--eval-size must be at least 1, got {size}")
    if any(not isinstance(spec, (str, Path)) for spec in specs):
        raise PolmError("--eval: each dataset is 'polm:<name>' or a file; give all as specs or all as EvalTask")
    specs = [str(spec) for spec in specs]
    repeated = sorted({spec for spec in specs if specs.count(spec) > 1})
    if repeated:
        raise PolmError(f"--eval {repeated[0]} is given twice; give each dataset once")
    stems = [bundled_name(spec) or Path(spec).stem for spec in specs]
    tasks = []
    for spec, stem in zip(specs, stems):
        check_data_spec(spec, "--eval")
        try:
            rows = list(load_rows(spec, EVAL_SPLIT)[:size])
            graded_rows(rows)
        except PolmError as error:
            raise PolmError(f"--eval {spec}: {error}") from None
        tasks.append(EvalTask(stem if stems.count(stem) == 1 else spec, spec, rows))
    return tasks


def exact_match_scorer(tasks: Sequence[EvalTask], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       batch_size: int = 32, show_progress: bool = False) -> Scorer:
    """The default :data:`Scorer`: the model loaded once, then ``polm.evaluate(model, task rows)``'s greedy
    ``exact_match`` on each task, ``{task name: exact_match}``.

    Raises:
        PolmError: ``max_new_tokens`` below 1.
    """
    from polm.engine.evaluation import evaluate
    from polm.engine.models import load_model

    if max_new_tokens < 1:
        raise PolmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")

    def exact_match(model: str) -> dict[str, float]:
        loaded, tokenizer = load_model(model)
        return {task.name: evaluate(loaded, task.rows, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, show_progress=show_progress)["exact_match"]
                for task in tasks}

    return exact_match


@dataclass(frozen=True)
class ScoringPlan:
    """The scorer a merge is scored with, the table's caption for its figures and what ``merge_eval.json``
    records of it."""

    scorer: Scorer
    metric: str
    settings: dict[str, Any]


def scoring_plan(tasks: Sequence[str | EvalTask] = (), scorer: Scorer | None = None, *,
                 eval_size: int = DEFAULT_EVAL_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 show_progress: bool = False) -> ScoringPlan:
    """:func:`exact_match_scorer` on ``tasks`` (data specs, read by :func:`eval_tasks`, or tasks it returned),
    or the user's ``scorer``, which scores tasks of its own.

    Raises:
        PolmError: neither or both given; see :func:`eval_tasks`.
    """
    if scorer is not None:
        if tasks:
            raise PolmError("give eval tasks or a scorer, not both: a scorer scores the tasks it knows")
        name = getattr(scorer, "__qualname__", type(scorer).__qualname__)
        return ScoringPlan(scorer, getattr(scorer, "__name__", name), {"scorer": name})
    if not tasks:
        raise PolmError("scoring a merge needs eval tasks (--eval DATA) or a scorer")
    tasks = list(tasks) if all(isinstance(task, EvalTask) for task in tasks) else eval_tasks(tasks, eval_size)
    settings = {"tasks": [{"name": task.name, "data": task.data, "split": EVAL_SPLIT, "rows": len(task.rows)}
                          for task in tasks], "eval_size": eval_size, "max_new_tokens": max_new_tokens}
    return ScoringPlan(exact_match_scorer(tasks, max_new_tokens=max_new_tokens, show_progress=show_progress),
                       "exact_match", settings)


@dataclass
class ScoredModel:
    """One row of the table: ``label`` (``base``, ``input 1``, ``merge``), the model as the config names it (the
    output folder for the merge) and the scorer's figures."""

    label: str
    model: str
    scores: dict[str, float]

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "scores": self.scores, "mean": self.mean}


def score_model(scorer: Scorer, model: str) -> dict[str, float]:
    """``scorer(model)``, checked to be a non-empty mapping of names to numbers.

    Raises:
        PolmError: the scorer returned anything else, naming the scorer and the model.
    """
    figures = scorer(model)
    name = getattr(scorer, "__qualname__", type(scorer).__qualname__)
    if not isinstance(figures, Mapping) or not figures:
        raise PolmError(f"scorer {name} returned {figures!r} for {model}; a scorer returns {{name: score}} with "
                        "at least one figure")
    try:
        return {str(key): float(value) for key, value in figures.items()}
    except (TypeError, ValueError):
        raise PolmError(f"scorer {name} returned {dict(figures)!r} for {model}; every figure must be a "
                        "number") from None


def loadable(reference: str, relative_to: Path | None = None) -> str:
    """What :func:`polm.load_model` reads for a config's reference: a registered name as it is, a local folder
    found beside the config first (a stage folder's ``final/``), anything else as a hub id."""
    from polm.engine.plugins import registry

    if reference in registry("models"):
        return reference
    folder = local_path(reference, relative_to)
    return str(folder) if folder is not None else reference


def score_inputs(config: MergeConfig, scorer: Scorer, relative_to: Path | None = None,
                 show_progress: bool = False) -> list[ScoredModel]:
    """The base (when the config names one) and each model merged, scored; a model named twice is scored once."""
    method = check_merge_config(config, relative_to=relative_to)
    named = [("base", str(config.base_model))] if config.base_model is not None else []
    named += [(f"input {index}", str(entry["model"]))
              for index, entry in enumerate(merged_models(config, method, relative_to), start=1)]
    scored: dict[str, dict[str, float]] = {}
    rows = []
    for label, reference in named:
        model = loadable(reference, relative_to)
        if model not in scored:
            if show_progress:
                get_logger().info("polm merge: scoring %s, %s", label, reference)
            scored[model] = score_model(scorer, model)
        rows.append(ScoredModel(label, reference, scored[model]))
    return rows


@dataclass
class MergeEvaluation:
    """The figures of a merge and its inputs; ``report`` is the merge's :class:`~.merge.MergeReport`."""

    rows: list[ScoredModel]
    metric: str
    settings: dict[str, Any]
    report: MergeReport | None = None

    def columns(self) -> list[str]:
        """The figures' names, in the order the scorer first returned them."""
        return list(dict.fromkeys(name for row in self.rows for name in row.scores))

    def table(self, title: str | None = None) -> Table:
        return scores_table(self.rows, self.columns(), title or f"polm merge: {self.metric} on held-out data")

    def document(self) -> dict[str, Any]:
        """What ``merge_eval.json`` holds: polm's version, the date, the settings and each row's figures."""
        return {**provenance(), "metric": self.metric, "settings": self.settings,
                "models": [row.as_dict() for row in self.rows]}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / EVAL_FILE
        path.write_text(json.dumps(self.document(), indent=2) + "\n")
        return path


def provenance() -> dict[str, Any]:
    import polm

    return {"polm_version": polm.__version__, "date": datetime.now().astimezone().isoformat(timespec="seconds")}


def scores_table(rows: Sequence[ScoredModel], columns: Sequence[str], title: str,
                 leading: Sequence[tuple[str, Sequence[str]]] = (), chosen: int | None = None) -> Table:
    """A row per model: its label and model (or the ``leading`` columns given, each ``(name, a value per
    row)``), its figure of each column and their mean; ``chosen`` (a row's index) is drawn in bold."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    leading = list(leading) or [("", [row.label for row in rows]), ("model", [row.model for row in rows])]
    for name, _ in leading:
        table.add_column(name, no_wrap=True)
    for column in (*columns, "mean"):
        table.add_column(column, justify="right")
    for index, row in enumerate(rows):
        figures = [_figure(row.scores.get(column)) for column in columns]
        table.add_row(*(values[index] for _, values in leading), *figures, _figure(row.mean),
                      style="bold" if index == chosen else None)
    return table


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(table: Table) -> None:
    """Print ``table`` on standard output, as wide as it needs to be when that is a file or a pipe."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, console.measure(table, options=console.options.update_width(1000)).maximum)
    console.print(table)


def evaluate_merge(config: MergeConfig, output: str | Path, tasks: Sequence[str | EvalTask] = (), *,
                   scorer: Scorer | None = None, eval_size: int = DEFAULT_EVAL_SIZE,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, relative_to: Path | None = None, seed: int = 0,
                   dtype: str | None = None, show_progress: bool = False) -> MergeEvaluation:
    """Merge ``config`` into ``output`` (:func:`~.merge.merge_models`), then score the base, each model merged and
    the merge, and write ``merge_eval.json`` into ``output``.

    Args:
        tasks: ``--eval`` data specs (or :class:`EvalTask`), scored with :func:`exact_match_scorer`.
        scorer: a :data:`Scorer` of the user's, instead of ``tasks``.
        eval_size, max_new_tokens: the rows graded per task and the tokens per answer (the default scorer's).
        relative_to, seed, dtype, show_progress: as :func:`~.merge.merge_models` takes them.

    Returns:
        A :class:`MergeEvaluation`, its ``report`` the merge's.

    Raises:
        PolmError: before anything is loaded or written, for bad tasks (see :func:`eval_tasks`), neither or both
            of ``tasks`` and ``scorer``, or an output folder that holds something; then as ``merge_models``
            raises; or a scorer that returns no figures.
    """
    output = Path(output)
    check_output_folder(output)
    plan = scoring_plan(tasks, scorer, eval_size=eval_size, max_new_tokens=max_new_tokens,
                        show_progress=show_progress)
    report = merge_models(config, output, relative_to=relative_to, seed=seed, dtype=dtype,
                          show_progress=show_progress)
    rows = score_inputs(config, plan.scorer, relative_to, show_progress)
    if show_progress:
        get_logger().info("polm merge: scoring the merge, %s", output)
    rows.append(ScoredModel("merge", str(output), score_model(plan.scorer, str(output))))
    evaluation = MergeEvaluation(rows, plan.metric, plan.settings, report)
    evaluation.write(output)
    return evaluation
