"""The Stage interface: one step of a post-training pipeline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import torch

from polm.engine.data import Row, Rows, bundled_name, check_data_spec, iter_rows, load_rows
from polm.engine.evaluation import exact_match, reference
from polm.engine.media import MediaModel
from polm.engine.objectives import Objective, check_objective_options, find_objective
from polm.engine.option_groups import DataOptions, RewardOptions
from polm.engine.options import StageOptions
from polm.engine.preflight import check_media, check_media_exists
from polm.engine.rewards import check_reward_options, check_rewards
from polm.engine.tuning import tuning_method


@dataclass
class StageContext:
    """What the pipeline hands a stage.

    Attributes:
        model: the model the stage starts from (the previous stage's result).
        tokenizer: its tokenizer.
        stage_dir: the stage's own folder inside the run folder.
        seed: the stage's seed (the pipeline seed plus the stage index).
        resume: continue from the newest checkpoint in ``stage_dir`` if there is one.
        on_log: called with each metrics record (for live plots).
        stop: set to ask the stage to checkpoint and return early.
    """

    model: torch.nn.Module
    tokenizer: Any
    stage_dir: Path
    seed: int
    resume: bool = False
    on_log: Callable[[dict[str, Any]], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class StageOutput:
    """What a stage returns: the trained model and its final metrics.

    Attributes:
        tokenizer: set by a stage that changes the tokenizer (a larger vocabulary, with the model's embeddings
            resized to it): the pipeline saves it in the stage's ``final/`` and hands it to the next stages.
            None keeps the tokenizer the stage was handed.
    """

    model: torch.nn.Module
    metrics: dict[str, float]
    interrupted: bool = False
    tokenizer: Any = None


class Stage:
    """Base class of pipeline stages registered through ``polm_register_stages``.

    A subclass sets ``Options`` (a dataclass, usually extending
    :class:`StageOptions` and the option groups of :mod:`polm.engine.option_groups`)
    and implements :meth:`run`. The pipeline validates options with
    :func:`polm.engine.options.parse_options` when the stage is added, and calls
    :meth:`check` on every stage before the first one starts.

    A stage that trains with a registered objective sets ``objective_family``
    (see :mod:`polm.engine.objectives`), and its options declare ``objective``
    and ``objective_options``.
    """

    Options: ClassVar[type] = StageOptions
    #: The metric the quickstart table and the app show for this stage.
    headline_metric: ClassVar[str] = "exact_match"
    #: False for a stage that trains a side model (a reward model) from the model it is handed: the pipeline
    #: saves the stage's output as its ``final/`` but hands the stage's starting model on to the next stage.
    trains_policy: ClassVar[bool] = True
    #: The family of the objectives the stage's ``objective`` option may name; None for a stage without one.
    objective_family: ClassVar[str | None] = None
    #: True for a stage whose result no later stage may start from (a quantized model is served, not trained):
    #: :meth:`polm.engine.pipeline.Pipeline.add` refuses a stage after it.
    terminal: ClassVar[bool] = False

    def __init__(self, name: str, options: Any) -> None:
        self.name = name
        self.options = options

    def check(self) -> None:
        """Fail fast on problems visible before loading a model, in what the options' groups hold.

        The data specs of :class:`~polm.engine.option_groups.DataOptions` load; the rewards of
        :class:`~polm.engine.option_groups.RewardOptions` are registered and ``reward_options`` names no
        other; ``objective`` is of the stage's ``objective_family`` and takes ``objective_options``. A
        subclass that checks more calls ``super().check()`` first.

        Raises:
            PolmError: naming the option.
        """
        options = self.options
        if isinstance(options, DataOptions):
            check_data_spec(options.data, "data")
            if options.eval_data is not None:
                check_data_spec(options.eval_data, "eval_data")
        if isinstance(options, RewardOptions):
            check_rewards(options.reward_weights(), options.reward_options)
        if self.objective_family is not None:
            check_objective_options(self.objective(), options.objective_options)

    def objective(self) -> Objective:
        """The objective named by the ``objective`` option, looked up now (plugins may have changed), for a
        stage with an ``objective_family``.

        Raises:
            PolmError: unknown, or not of the stage's ``objective_family``.
        """
        return find_objective(self.options.objective, self.objective_family)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model this stage trains: its ``tuning`` method applied to the starting model.

        A model that reads media (:class:`~polm.engine.media.MediaModel`) applies the method to its language
        model and keeps its connectors trainable (LLaVA stage 2), whatever the stage.
        """
        if isinstance(model, MediaModel):
            return model.tune_language_model(self._apply_tuning)
        return self._apply_tuning(model)

    def _apply_tuning(self, model: torch.nn.Module) -> torch.nn.Module:
        tuning = getattr(self.options, "tuning", None)
        if tuning is None:
            return model
        from polm.engine.plugins import registry

        return registry("tuning_methods").get(tuning).prepare(model, self.options.tuning_options)

    def rows(self) -> Rows:
        """The training rows of ``data``, its columns renamed by ``columns``."""
        return load_rows(self.options.data, "train", self.options.columns)

    def eval_rows(self) -> list[dict[str, Any]]:
        """Held-out rows: ``eval_data``, else the ``test`` split of a bundled ``data``; at most ``eval_size``."""
        spec = self._eval_spec()
        if spec is None:
            return []
        return load_rows(spec, "test", getattr(self.options, "columns", None))[:self.options.eval_size]

    def _eval_spec(self) -> Any:
        """Where :meth:`eval_rows` come from; None when there are none (``eval_size`` 0, or no source)."""
        if not getattr(self.options, "eval_size", 0):
            return None
        spec = getattr(self.options, "eval_data", None)
        data = getattr(self.options, "data", None)
        if spec is None and isinstance(data, str) and bundled_name(data) is not None:
            spec = data
        return spec

    def input_rows(self) -> Iterator[tuple[Row, str]]:
        """Every row the stage reads, ``data`` then the held-out rows, with where each came from, one at a time."""
        if not isinstance(self.options, DataOptions):
            return
        yield from iter_rows(self.options.data, "train", self.options.columns)
        spec = self._eval_spec()
        if spec is not None:
            yield from islice(iter_rows(spec, "test", self.options.columns), self.options.eval_size)

    def check_rows(self) -> None:
        """Read every row of :meth:`input_rows` (an error names its ``file:line`` and field) and check that each
        media file it names exists. Needs no model: the pipeline asks it of every stage before the model loads.

        Raises:
            PolmError: the first bad row.
        """
        check_media_exists(self.input_rows())

    def check_inputs(self, model: torch.nn.Module) -> None:
        """What needs the model the stage starts from (``model``, after :meth:`prepare`): the rows' media are of
        kinds it reads and each file reads through its encoder, and each reward's own options hold (a reward
        model's folder). The pipeline asks it at the start of each stage, before the stage writes; for the
        first stage, before anything of the run is written.

        Raises:
            PolmError: naming the row's ``file:line``, the file or the reward.
        """
        if isinstance(self.options, RewardOptions):
            check_reward_options(self.options.reward_weights(), self.options.reward_options)
        check_media(model, self.input_rows())

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Held-out metrics of ``model``; by default greedy ``exact_match`` on rows with references."""
        rows = [row for row in self.eval_rows() if reference(row) is not None]
        if not rows:
            return {}
        return exact_match(model, tokenizer, rows, getattr(self.options, "max_new_tokens", 32))

    def run(self, context: StageContext) -> StageOutput:
        """Train ``context.model`` (already prepared) and return it with final metrics."""
        raise NotImplementedError

    def load_finished(self, model: torch.nn.Module, final_dir: Path) -> torch.nn.Module:
        """The stage's result when a resumed run finds it finished: the weights in ``final_dir`` loaded into
        ``model`` (the starting model after :meth:`prepare`) through the stage's tuning method. A stage whose
        result has another form than the model it prepared (quantized tensors, pruned shapes) loads
        ``final_dir`` itself."""
        tuning_method(self.options).load_weights(model, final_dir)
        return model

    def load_finished_tokenizer(self, tokenizer: Any, final_dir: Path) -> Any:
        """The tokenizer the stages after this one use when a resumed run finds it finished: ``tokenizer``, the
        one it started with. A stage whose :class:`StageOutput` carries a tokenizer reads it back from
        ``final_dir``."""
        return tokenizer
