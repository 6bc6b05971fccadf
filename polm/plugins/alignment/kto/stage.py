"""The ``kto`` stage: KTO on unpaired desirable / undesirable completions.

Each step scores a batch of B unpaired rows under the policy and the
reference (the starting model), and B mismatched rows (row ``i``'s prompt with
row ``i + 1``'s completion) whose policy-minus-reference log-prob estimates
KTO's reference point ``z0`` (no gradient); see
:func:`~polm.plugins.alignment.objectives.kto.kto_loss`. Data may be
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

from polm.engine.data import check_data_spec, load_rows
from polm.engine.encoding import keep_rows_that_fit
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
from polm.plugins.alignment.objective_lookup import Objective, check_function_options
from polm.plugins.alignment.objectives import kl_estimate, kto_loss
from polm.plugins.alignment.preference import PreferenceStage

KTO_ARGUMENTS = 4  # policy log-probs, reference log-probs, labels, reference point


@dataclass
class KTOOptions(StageOptions):
    """Options of ``kto``."""

    data: Any = field(default=None, metadata={
        "help": "unpaired rows {prompt, completion, label: true/false}, or preference rows {prompt, chosen, "
                "rejected} (each gives a desirable and an undesirable row): 'polm:<name>', JSONL, or a list"})
    objective_options: dict = field(default_factory=dict, metadata={
        "help": "KTO's hyperparameters: beta, desirable_weight, undesirable_weight"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("option 'data' is required (unpaired or preference rows, e.g. 'polm:arithmetic-prefs')")


class KTOStage(PreferenceStage):
    """Train on unpaired completions labelled desirable or not, against the starting model."""

    Options = KTOOptions

    def objective(self) -> Objective:
        """KTO's reference-based, summed log-probs (what :meth:`evaluate` scores held-out pairs with)."""
        return Objective("kto", kto_loss)

    def check(self) -> None:
        check_data_spec(self.options.data, "data")
        if self.options.eval_data is not None:
            check_data_spec(self.options.eval_data, "eval_data")
        zeros = torch.zeros(1)
        check_function_options("objective 'kto'", kto_loss, self.options.objective_options, KTO_ARGUMENTS,
                               (zeros, zeros, torch.ones(1, dtype=torch.bool), 0.0))

    def encode_unpaired(self, tokenizer: Any) -> list[EncodedCompletion]:
        """The training rows that fit ``max_length`` (:func:`keep_rows_that_fit`)."""
        rows = unpaired_rows(load_rows(self.options.data, "train"))
        max_length = self.options.max_length
        return keep_rows_that_fit(self.name, [encode_unpaired(tokenizer, row, max_length) for row in rows],
                                  max_length)

    def run(self, context: StageContext) -> StageOutput:
        model, tokenizer, options = context.model, context.tokenizer, self.options
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
            return kto_loss(logps, ref[:size], batch["desirable"], reference_point, **options.objective_options)

        task = TrainingTask(
            rows=self.encode_unpaired(tokenizer),
            collate=lambda items: collate_unpaired(items, tokenizer.pad_token_id, options.max_length),
            compute_loss=compute_loss,
            evaluate=lambda policy: self.evaluate(policy, tokenizer, eval_reference),
        )
        return train(self.name, context, options, task)
