"""The ``prm`` stage: train a process reward model on step-labelled solutions.

Rows are ``{prompt, steps: [...], labels: [...]}`` with a 0/1 label per step
(``polm:arithmetic-steps`` bundles some), and optionally ``completion``: the
whole solution as the policy writes it, in which the steps are found in order.
Without it the solution is the steps joined by ``separator``. The stage turns
its starting causal LM into a token classifier that shares its backbone
(:func:`~polm.plugins.reasoning.prm.model.process_reward_model`) and trains it
with the shared loop to tell right steps from wrong ones where each step ends
(:func:`~polm.plugins.reasoning.prm.steps.encode_solution`). The saved model is a transformers token-classification model; the
``prm`` reward and ``best_of_n`` use it by folder. Make it the last stage of a
pipeline: the model it hands on is the PRM, not a language model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from polm.engine.data import Row, check_data_spec, load_rows
from polm.engine.encoding import Encoded, pad_batch, truncate
from polm.engine.errors import PolmError
from polm.engine.options import StageOptions
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.engine.tuning import is_peft, unwrap_peft
from polm.plugins.reasoning.prm.model import (
    is_process_reward_model,
    process_reward_model,
    step_classification_loss,
    step_scores,
)
from polm.plugins.reasoning.prm.steps import Span, encode_solution, locate_steps


@dataclass
class PRMOptions(StageOptions):
    """Options of ``prm``."""

    data: Any = field(default=None, metadata={
        "help": "step-labelled rows {prompt, steps, labels, completion?}: 'polm:arithmetic-steps', a JSONL path "
                "or rows"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    separator: str = field(default="\n", metadata={"help": "what ends each step (also how completions are split)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("option 'data' is required (step-labelled rows, e.g. 'polm:arithmetic-steps')")
        if self.tuning != "full":
            raise ValueError(f"'tuning' must be 'full' for prm (its new score head must train), got '{self.tuning}'")
        if not self.separator:
            raise ValueError("'separator' must not be empty")


def _checked(row: Row, where: str, separator: str) -> tuple[str, list[Span], list[int]]:
    """The row's solution text, its steps' spans in it and its labels."""
    steps, labels, completion = row.get("steps"), row.get("labels"), row.get("completion")
    if not isinstance(steps, list) or not steps or not all(isinstance(step, str) for step in steps):
        raise PolmError(f"{where}: field 'steps' must be a non-empty list of strings")
    if not isinstance(labels, list) or len(labels) != len(steps) or any(label not in (0, 1) for label in labels):
        raise PolmError(f"{where}: field 'labels' must hold one 0 or 1 per step; got {labels!r} for "
                        f"{len(steps)} step{'s' * (len(steps) != 1)}")
    if completion is None:
        completion = separator.join(steps)
    elif not isinstance(completion, str):
        raise PolmError(f"{where}: field 'completion' must be a string, got {type(completion).__name__}")
    try:
        spans = locate_steps(completion, steps)
    except ValueError as error:
        raise PolmError(f"{where}: {error}; each step must appear in field 'completion', in order") from None
    return completion, spans, labels


class PRMStage(Stage):
    """Train a per-step right/wrong head on the starting model's backbone."""

    Options = PRMOptions
    headline_metric = "step_accuracy"
    trains_policy = False

    def check(self) -> None:
        check_data_spec(self.options.data, "data")
        if self.options.eval_data is not None:
            check_data_spec(self.options.eval_data, "eval_data")

    def examples(self, tokenizer: Any, rows: list[Row], what: str) -> list[Encoded]:
        """The rows encoded with their step labels; a row with no step end within ``max_length`` is dropped."""
        encoded = []
        for index, row in enumerate(rows):
            completion, spans, labels = _checked(row, f"{what} row {index}", self.options.separator)
            example = truncate(encode_solution(tokenizer, row["prompt"], completion, spans, labels),
                               self.options.max_length)
            if example is not None:
                encoded.append(example)
        return encoded

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Held-out ``step_accuracy`` (P(right) > 0.5 agrees with the label) and ``solution_accuracy``
        (the lowest step score > 0.5 exactly when every step is right); {} for a model that is no PRM yet."""
        rows = [row for row in self.eval_rows() if "steps" in row]
        if not rows or not is_process_reward_model(model):
            return {}
        checked = [_checked(row, f"eval_data row {index}", self.options.separator) for index, row in enumerate(rows)]
        scores = step_scores(model, tokenizer, [row["prompt"] for row in rows], [text for text, _, _ in checked],
                             [spans for _, spans, _ in checked], batch_size=self.options.batch_size)
        steps_right = [(score > 0.5) == bool(label) for values, (_, _, labels) in zip(scores, checked)
                       for score, label in zip(values, labels)]
        solutions_right = [(min(values) > 0.5) == all(labels) for values, (_, _, labels) in zip(scores, checked)]
        return {"step_accuracy": sum(steps_right) / len(steps_right),
                "solution_accuracy": sum(solutions_right) / len(solutions_right)}

    def run(self, context: StageContext) -> StageOutput:
        tokenizer, model = context.tokenizer, context.model
        if not is_process_reward_model(model):
            torch.manual_seed(context.seed)  # the new score head
            backbone = unwrap_peft(copy.deepcopy(model)) if is_peft(model) else model  # merge a copy, not the policy
            model = process_reward_model(backbone)

        def compute_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, 2)
            return step_classification_loss(logits, batch["labels"])

        task = TrainingTask(
            rows=self.examples(tokenizer, load_rows(self.options.data, "train"), "data"),
            collate=lambda items: pad_batch(items, tokenizer.pad_token_id),
            compute_loss=compute_loss,
            evaluate=lambda model: self.evaluate(model, tokenizer),
        )
        return train(self.name, replace(context, model=model), self.options, task)
