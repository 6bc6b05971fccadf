"""Language-modelling stages: next-token cross-entropy on the completion tokens of encoded rows.

The family every stage belongs to that trains on given text rather than on preferences or rewards:
``sft`` (with packing and NEFTune on top), ``align`` (the same loss through frozen encoders and trained
connectors) and the updates of ``rft`` on its accepted samples. The loss and the stage base live here, in
the engine, so those plugins share them without importing each other. ``sft``, ``align`` and ``rft`` train
with any registered objective of the ``language_modelling`` family (``objective:``, see
:mod:`polm.engine.objectives`); the default ``completion`` is :func:`completion_loss`, registered by the
fine-tuning plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from polm.engine.encoded_rows import encoded_rows
from polm.engine.encoding import (
    IGNORE_INDEX,
    Encoded,
    encode_row,
    media_inputs,
    pad_batch,
    truncate,
)
from polm.engine.objectives import LANGUAGE_MODELLING, LanguageModellingObjective
from polm.engine.option_groups import DataOptions
from polm.engine.options import StageOptions
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of predicting ``labels[t + 1]`` from position ``t``.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, ``-100`` where no loss is taken (prompt,
            non-assistant turns, padding).

    Returns:
        The loss averaged over labelled tokens, and metrics: ``token_accuracy``
        (greedy next-token hits among labelled tokens) and ``label_tokens``.
    """
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    count = mask.sum()
    if count == 0:
        raise ValueError("a batch has no labelled tokens; check max_length and the loss mask")
    loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / count
    with torch.no_grad():
        hits = (shifted_logits.argmax(-1) == targets) & mask
        accuracy = float(hits.sum() / count)
    return loss, {"token_accuracy": accuracy, "label_tokens": float(count)}


def label_tokens(batch: dict[str, Any]) -> int:
    """The tokens :func:`completion_loss` averages over in ``batch`` (labelled positions after the first): a
    language-modelling batch's weight in the loss normalisation over an optimizer step."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def lm_loss(model: torch.nn.Module, batch: dict[str, Any], objective: LanguageModellingObjective = completion_loss,
            options: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``objective`` (by default the completion loss) of a padded batch, or of a packed one (``position_ids``
    delimit its samples), called with the keyword ``options``."""
    if "position_ids" in batch:  # packed: no attention mask, positions delimit the samples
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **media_inputs(model, batch.get("media"))).logits
    return objective(logits, batch["labels"], **(options or {}))


@dataclass
class LanguageModellingOptions(StageOptions, DataOptions):
    """Options of a language-modelling stage; ``data`` rows may be ``{text}``, ``{prompt, completion}``,
    ``{messages}`` or ``{prompt, answer}``."""

    objective: str = field(default="completion", metadata={
        "help": "a registered language_modelling objective: completion (cross-entropy on completion tokens) "
                "or a plugin's"})
    objective_options: dict = field(default_factory=dict, metadata={"help": "the objective's keyword options"})


class LanguageModellingStage(Stage):
    """Cross-entropy on completion / assistant tokens of ``data``, prompts masked, in padded batches."""

    Options = LanguageModellingOptions
    objective_family = LANGUAGE_MODELLING

    def encode(self, tokenizer: Any) -> Sequence[Encoded]:
        """The training rows encoded, cut to ``max_length``, those left without a completion token dropped;
        a data file's are encoded once and read from disk (:func:`~polm.engine.encoded_rows.encoded_rows`)."""
        max_length = self.options.max_length
        return encoded_rows(self.name, self.options.data, self.options.columns, tokenizer,
                            lambda row: truncate(encode_row(tokenizer, row), max_length), max_length)

    def training_task(self, tokenizer: Any) -> TrainingTask:
        """Rows, collation and loss: the encoded rows in padded batches."""
        return TrainingTask(
            rows=self.encode(tokenizer),
            collate=lambda items: pad_batch(items, tokenizer.pad_token_id),
            compute_loss=self.loss(),
            weigh=label_tokens,
            evaluate=lambda model: self.evaluate(model, tokenizer),
        )

    def loss(self) -> Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]:
        """The training loop's ``compute_loss``: :func:`lm_loss` with the stage's objective and its options."""
        return partial(lm_loss, objective=self.objective().fn, options=self.options.objective_options)

    def run(self, context: StageContext) -> StageOutput:
        return train(self.name, context, self.options, self.training_task(context.tokenizer))
