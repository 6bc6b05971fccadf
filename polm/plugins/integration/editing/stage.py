"""The ``edit`` stage: facts written into the model it starts from by ROME or MEMIT; no training::

    stages:
      - {name: sft, data: polm:facts, max_steps: 3000, eval_size: 0}     # teach the facts
      - name: edit
        requests: polm:facts                # its edits split; or a .jsonl file of {prompt, subject, target} rows
        method: memit                       # or rome (one request after another, one layer)
        layers: [0, 1]                      # default: see polm.plugins.integration.editing.model.default_layers
        covariance_corpus: polm:facts       # text whose tokens give each layer's key second moment

Every request is read and checked before the model loads (a bad row is named by ``file:line``). The stage scores
the requests before and after the edit (``efficacy``, ``paraphrase`` and ``neighbourhood``, the last two where
the rows carry ``paraphrases`` or ``neighbourhood``; see :mod:`.scores`) and hands the edited model on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polm.engine.data import check_data_spec
from polm.engine.errors import PolmError
from polm.engine.media import reads_media
from polm.engine.models import load_model
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.tuning import unwrap_peft
from polm.plugins.integration.editing.api import METHODS, edit
from polm.plugins.integration.editing.requests import load_requests
from polm.plugins.integration.editing.scores import edit_scores
from polm.plugins.integration.editing.values import ValueOptions

_VALUES = ValueOptions()


@dataclass
class EditOptions:
    """Options of ``edit``: what to write, by which method, where, and how each target value is found."""

    requests: Any = field(default=None, metadata={
        "help": "the edit requests: polm:<name> (its requests_split) or a .jsonl file of {prompt, subject, "
                "target} rows (optional paraphrases and neighbourhood are scored)"})
    requests_split: str = field(default="edits", metadata={"help": "the split of a bundled requests set"})
    method: str = field(default="rome", metadata={
        "help": "rome (rank-one, one layer, requests one after another) or memit (all at once over layers)",
        "choices": METHODS})
    layers: list = field(default_factory=list, metadata={
        "help": "decoder layers whose MLP down_proj is edited (ROME: one); empty: the method's default"})
    trace_layers: bool = field(default=False, metadata={
        "help": "with no layers: choose them by causal tracing (ROME the MLP of the largest effect, MEMIT every "
                "layer up to it)"})
    covariance_corpus: Any = field(default=None, metadata={
        "help": "text rows (polm:<name> or a file) whose tokens estimate each layer's key second moment; "
                "unset: the identity (ROME's minimum-norm ablation)"})
    covariance_samples: int = field(default=1000, metadata={"help": "rows of covariance_corpus read", "min": 1})
    prior_weight: float = field(default=1.0, metadata={
        "help": "memit: lambda, the weight of the corpus keys against the new ones (mom2_update_weight)",
        "above": 0})
    steps: int = field(default=_VALUES.steps, metadata={"help": "Adam steps optimising each target value",
                                                        "min": 1})
    lr: float = field(default=_VALUES.lr, metadata={"help": "Adam's learning rate for the target value",
                                                    "above": 0})
    kl_factor: float = field(default=_VALUES.kl_factor, metadata={
        "help": "weight of the KL term keeping the subject's own next-token distribution", "min": 0})
    weight_decay: float = field(default=_VALUES.weight_decay, metadata={
        "help": "weight of |delta|^2 / |h|^2 in the target value's loss", "min": 0})
    clamp_norm: float = field(default=_VALUES.clamp_norm, metadata={
        "help": "|delta| is kept at most this many times |h|", "above": 0})
    prefixes: list = field(default_factory=lambda: list(_VALUES.prefixes), metadata={
        "help": "texts put before each prompt when its value and key are found ('' is the prompt alone)"})

    def __post_init__(self) -> None:
        if self.requests is None:
            raise ValueError("edit needs 'requests': polm:<name> or a .jsonl file of {prompt, subject, target} rows")
        if self.method == "rome" and len(self.layers) > 1:
            raise ValueError(f"'layers': rome edits one layer, got {self.layers}; use method memit for several")
        if not all(isinstance(layer, int) and layer >= 0 for layer in self.layers):
            raise ValueError(f"'layers' must be layer indices (integers from 0), got {self.layers}")
        if not self.prefixes or not all(isinstance(prefix, str) for prefix in self.prefixes):
            raise ValueError("'prefixes' must be a non-empty list of strings ('' is the prompt alone)")

    def value_options(self) -> ValueOptions:
        return ValueOptions(self.steps, self.lr, self.kl_factor, self.weight_decay, self.clamp_norm,
                            _VALUES.stop_nll, tuple(self.prefixes))


class EditStage(Stage):
    """Write ``{prompt, subject, target}`` facts into the model's MLP weights (ROME or MEMIT); no training."""

    Options = EditOptions
    headline_metric = "efficacy"

    def check(self) -> None:
        """The requests and the covariance corpus can be found (their rows are read by :meth:`check_rows`)."""
        super().check()
        if isinstance(self.options.requests, (str, Path)) and not str(self.options.requests).startswith("polm:"):
            if not Path(self.options.requests).is_file():
                raise PolmError(f"option 'requests': requests file not found: {self.options.requests}")
        elif isinstance(self.options.requests, str):
            check_data_spec(self.options.requests, "requests")
        if self.options.covariance_corpus is not None:
            check_data_spec(self.options.covariance_corpus, "covariance_corpus")

    def check_rows(self) -> None:
        """Every request is well formed and names a subject its prompt contains.

        Raises:
            PolmError: naming the row's ``file:line`` and the field.
        """
        load_requests(self.options.requests, self.options.requests_split)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The starting model with an earlier stage's adapters merged in.

        Raises:
            PolmError: a model that reads media (edit takes text language models).
        """
        if reads_media(model):
            raise PolmError(f"{self.name}: {type(model).__name__} reads media; edit takes text language models")
        return unwrap_peft(model)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """``efficacy``, ``paraphrase`` and ``neighbourhood`` of the requests on ``model`` (:mod:`.scores`)."""
        return edit_scores(model, tokenizer, load_requests(self.options.requests, self.options.requests_split))

    def run(self, context: StageContext) -> StageOutput:
        options = self.options
        result = edit(context.model, context.tokenizer, load_requests(options.requests, options.requests_split),
                      method=options.method, layers=options.layers or None, trace=options.trace_layers,
                      covariance_corpus=options.covariance_corpus, covariance_samples=options.covariance_samples,
                      value_options=options.value_options(), prior_weight=options.prior_weight)
        metrics = {f"eval/{key}" if not key.endswith(("nll", "norm", "seconds", "requests")) else key: value
                   for key, value in result.metrics.items()}
        return StageOutput(model=result.model, metrics=metrics)

    def load_finished(self, model: torch.nn.Module, final_dir: Path) -> torch.nn.Module:
        """The edited model saved in ``final_dir``."""
        return load_model(final_dir)[0]
