"""The ``kto`` stage: KTO on unpaired desirable / undesirable completions.

Each step scores a batch of B unpaired rows under the policy and the
reference (the starting model), and B mismatched rows (row ``i``'s prompt with
row ``i + 1``'s completion) whose policy-minus-reference log-prob estimates
KTO's reference point ``z0`` (no gradient), and hands them to the unpaired
objective named by ``objective`` (default ``kto``,
:func:`~polm.plugins.alignment.objectives.kto.kto_loss`). Data may be
unpaired rows or preference pairs (see :mod:`polm.plugins.alignment.kto.rows`).

Held-out ``reward_accuracy`` is measured on preference pairs (``eval_data``,
or the test split of a bundled preference ``data``) exactly as in ``dpo``: the
fraction of pairs whose chosen answer gains more log-prob over the starting
model than the rejected one. Unpaired held-out rows give no such figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polm.engine.encoding import keep_rows_that_fit
from polm.engine.objectives import UNPAIRED
from polm.engine.option_groups import DataOptions
from polm.engine.options import StageOptions
from polm.engine.rl.logps import sequence_logps
from polm.engine.rl.reference import ReferenceModel
from polm.engine.stage import StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.alignment.kto.rows import (
    EncodedCompletion,
    collate_unpaired,
    encode_unpaired,
    unpaired_rows,
)
from polm.plugins.alignment.objectives import kl_estimate
from polm.plugins.alignment.preference import PreferenceStage


@dataclass
class KTOOptions(StageOptions, DataOptions):
    """Options of ``kto``; ``data`` holds unpaired rows ``{prompt, completion, label: true/false}``, or
    preference rows ``{prompt, chosen, rejected}`` (each gives a desirable and an undesirable row)."""

    objective: str = field(default="kto", metadata={"help": "a registered unpaired objective: kto or a plugin's"})
    objective_options: dict = field(default_factory=dict, metadata={
        "help": "the objective's hyperparameters; kto's: beta, desirable_weight, undesirable_weight"})


class KTOStage(PreferenceStage):
    """Train on unpaired completions labelled desirable or not, against the starting model."""

    Options = KTOOptions
    objective_family = UNPAIRED

    def encode_unpaired(self, tokenizer: Any) -> list[EncodedCompletion]:
        """The training rows that fit ``max_length`` (:func:`keep_rows_that_fit`)."""
        rows = unpaired_rows(self.rows())
        max_length = self.options.max_length
        return keep_rows_that_fit(self.name, [encode_unpaired(tokenizer, row, max_length) for row in rows],
                                  max_length)

    def run(self, context: StageContext) -> StageOutput:
        model, tokenizer, options = context.model, context.tokenizer, self.options
        objective = self.objective()  # at run time: plugins may have changed
        reference = ReferenceModel(model)
        eval_reference = self.eval_reference_logps(model, tokenizer, reference)

        def compute_loss(policy: torch.nn.Module, batch: dict[str, torch.Tensor]):
            size = batch["desirable"].shape[0]
            rows = {key: batch[key][:size] for key in ("input_ids", "attention_mask", "labels")}
            others = {key: batch[key][size:] for key in ("input_ids", "attention_mask", "labels")}
            logps = sequence_logps(policy, rows)  # (B,)
            with torch.no_grad():
                mismatched_logps = sequence_logps(policy, others)  # (B,)
            ref = reference.logps(policy, batch)  # (2B,): the rows, then the mismatched rows
            reference_point = kl_estimate(mismatched_logps, ref[size:])
            return objective.fn(logps, ref[:size], batch["desirable"], reference_point, **options.objective_options)

        task = TrainingTask(
            rows=self.encode_unpaired(tokenizer),
            collate=lambda items: collate_unpaired(items, tokenizer.pad_token_id, options.max_length),
            compute_loss=compute_loss,
            evaluate=lambda policy: self.evaluate(policy, tokenizer, eval_reference),
        )
        return train(self.name, context, options, task)
