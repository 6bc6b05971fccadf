"""The ``prm`` stage: train a process reward model on step-labelled solutions.

Rows are ``{prompt, steps: [...], labels: [...]}`` with a 0/1 label per step
(``polm:arithmetic-steps`` bundles some), and optionally ``completion``: the
whole solution as the policy writes it, in which the steps are found in order.
Without it the solution is the steps joined by ``separator``. The stage turns
a copy of its starting causal LM into a PRM
(:func:`~polm.plugins.reasoning.prm.model.process_reward_model`) and trains it
with the shared loop to tell right steps from wrong ones: with ``head:
classifier`` a new two-class head read where each step ends
(:func:`~polm.plugins.reasoning.prm.steps.encode_solution`), with ``head:
likelihood`` the LM's probability of each step's least likely token
(:mod:`polm.plugins.reasoning.prm.likelihood`). The saved model loads with
transformers (a token classifier, or a causal LM whose config says
``polm_prm_head: likelihood``); the ``prm`` reward and ``best_of_n`` use it by
folder. Make it the last stage of a pipeline: the model it hands on is the
PRM, not the policy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from polm.engine.data import Row, Rows, row_format, validate_row
from polm.engine.encoding import IGNORE_INDEX, keep_rows_that_fit, pad_batch, truncate
from polm.engine.errors import PolmError
from polm.engine.option_groups import DataOptions
from polm.engine.options import StageOptions
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.engine.tuning import is_peft, unwrap_peft
from polm.plugins.reasoning.prm.likelihood import likelihood_step_loss, step_labels, step_token_logps
from polm.plugins.reasoning.prm.model import (
    HEADS,
    prm_head,
    process_reward_model,
    step_classification_loss,
    step_scores,
)
from polm.plugins.reasoning.prm.steps import Span, StepExample, encode_solution, locate_steps, pad_step_index


@dataclass
class PRMOptions(StageOptions, DataOptions):
    """Options of ``prm``; ``data`` holds step-labelled rows ``{prompt, steps, labels, completion?}``
    (e.g. ``polm:arithmetic-steps``)."""

    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate; by default 5e-5 for the likelihood head (it fine-tunes the LM itself) "
                "and 5e-4 for the classifier head (new weights)"})
    separator: str = field(default="\n", metadata={"help": "what ends each step (also how completions are split)"})
    head: str = field(default="likelihood", metadata={
        "help": "'likelihood': the LM itself, a step scored by the probability of its least likely token; "
                "'classifier': a new right/wrong head read where each step ends (Lightman et al. 2023). "
                "On polm:arithmetic-steps the likelihood head reached 0.82 held-out step accuracy, the "
                "classifier 0.70", "choices": HEADS})

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 5e-4 if self.head == "classifier" else 5e-5
        super().__post_init__()
        if self.tuning != "full":
            raise ValueError(f"'tuning' must be 'full' for prm (the PRM is saved as a whole model), got '{self.tuning}'")
        if not self.separator:
            raise ValueError("'separator' must not be empty")


def _checked(row: Row, where: str, separator: str) -> tuple[str, list[Span], list[int]]:
    """The row's solution text, its steps' spans in it and its labels; ``where`` names the row in errors."""
    if row_format(row) != "steps":
        raise PolmError(f"{where}: a prm row needs fields 'prompt', 'steps' and 'labels'; got {sorted(row)}")
    row = validate_row(row, where)
    completion = row.get("completion", separator.join(row["steps"]))
    try:
        spans = locate_steps(completion, row["steps"])
    except ValueError as error:
        raise PolmError(f"{where}: {error}; each step must appear in field 'completion', in order") from None
    return completion, spans, row["labels"]


def _where(rows: list[Row], index: int, what: str) -> str:
    """Where row ``index`` came from (``file.jsonl:12``), or its place in ``what``."""
    return rows.where(index) if isinstance(rows, Rows) else f"{what} row {index}"


class PRMStage(Stage):
    """Train a per-step right/wrong head on the starting model's backbone."""

    Options = PRMOptions
    headline_metric = "step_accuracy"
    trains_policy = False

    def examples(self, tokenizer: Any, rows: list[Row], what: str) -> list[StepExample]:
        """The rows encoded with their step labels, that fit ``max_length`` (:func:`keep_rows_that_fit`: a row
        with no step end within it is skipped)."""
        max_length = self.options.max_length
        encoded: list[StepExample | None] = []
        for index, row in enumerate(rows):
            completion, spans, labels = _checked(row, _where(rows, index, what), self.options.separator)
            example = encode_solution(tokenizer, row["prompt"], completion, spans, labels)
            cut = truncate(example, max_length)
            encoded.append(None if cut is None else
                           StepExample(cut.input_ids, cut.labels, step_index=example.step_index[:max_length]))
        return keep_rows_that_fit(self.name, encoded, max_length, what)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Held-out ``step_accuracy`` (P(right) > 0.5 agrees with the label) and ``solution_accuracy``
        (the lowest step score > 0.5 exactly when every step is right); {} until the model has the stage's head."""
        all_rows = self.eval_rows()
        indices = [index for index, row in enumerate(all_rows) if "steps" in row]
        if not indices or prm_head(model) != self.options.head:
            return {}
        rows = [all_rows[index] for index in indices]
        checked = [_checked(all_rows[index], _where(all_rows, index, "eval_data"), self.options.separator)
                   for index in indices]
        scores = step_scores(model, tokenizer, [row["prompt"] for row in rows], [text for text, _, _ in checked],
                             [spans for _, spans, _ in checked], batch_size=self.options.batch_size)
        steps_right = [(score > 0.5) == bool(label) for values, (_, _, labels) in zip(scores, checked)
                       for score, label in zip(values, labels)]
        solutions_right = [(min(values) > 0.5) == all(labels) for values, (_, _, labels) in zip(scores, checked)]
        return {"step_accuracy": sum(steps_right) / len(steps_right),
                "solution_accuracy": sum(solutions_right) / len(solutions_right)}

    def run(self, context: StageContext) -> StageOutput:
        tokenizer, model, head = context.tokenizer, context.model, self.options.head
        if prm_head(model) not in (None, head):
            raise PolmError(f"the starting model is a PRM with the '{prm_head(model)}' head; set head: "
                            f"{prm_head(model)} to go on training it, or start from a language model")
        if prm_head(model) is None:
            torch.manual_seed(context.seed)  # the classifier's new score head
            backbone = unwrap_peft(copy.deepcopy(model)) if is_peft(model) else model  # merge a copy, not the policy
            model = process_reward_model(backbone, head)

        def collate(items: list[StepExample]) -> dict[str, Any]:
            batch = pad_batch(items, tokenizer.pad_token_id)
            batch["step_index"] = pad_step_index(items)
            return batch

        def compute_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if head == "classifier":
                return step_classification_loss(logits, batch["labels"])  # logits (B, T, 2)
            num_steps = int(batch["step_index"].max()) + 1
            step_logps = step_token_logps(logits, batch["input_ids"], batch["step_index"], num_steps)  # (B, S)
            return likelihood_step_loss(step_logps, step_labels(batch["labels"], num_steps))

        task = TrainingTask(
            rows=self.examples(tokenizer, self.rows(), "data"),
            collate=collate,
            compute_loss=compute_loss,
            weigh=lambda batch: int((batch["labels"] != IGNORE_INDEX).sum()),  # both heads: a mean over steps
            evaluate=lambda model: self.evaluate(model, tokenizer),
        )
        return train(self.name, replace(context, model=model), self.options, task)
