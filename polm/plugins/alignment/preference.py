"""The base of the stages that train against the starting model and are judged on held-out preference pairs.

``dpo`` (and its presets), ``kto`` and ``online_dpo`` share it: the objective
they train with (looked up by name in its family when the stage is checked and
again at run time, see :mod:`polm.engine.objectives`), the reference model it
needs (:class:`~polm.engine.rl.reference.ReferenceModel`; none for a
reference-free objective), and the held-out ``reward_accuracy`` on pairs. Each
subclass sets ``Options`` (with ``objective`` and ``objective_options`` fields:
:class:`PairwiseObjectiveOptions` for a pairwise objective) and its own
:meth:`~polm.engine.stage.Stage.run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polm.engine.data import encode_each, row_format
from polm.engine.encoding import keep_rows_that_fit
from polm.engine.evaluation import exact_match
from polm.engine.objectives import PAIRWISE, Objective
from polm.engine.rl.logps import sequence_logps
from polm.engine.rl.reference import ReferenceModel, eval_mode
from polm.engine.stage import Stage
from polm.plugins.alignment.logps import EncodedPair, collate_pairs, encode_pair


@dataclass
class PairwiseObjectiveOptions:
    """The objective options of the stages that train with a pairwise objective (``dpo`` and its presets,
    ``online_dpo``)."""

    objective: str = field(default="dpo", metadata={
        "help": "a registered pairwise objective: dpo, ipo, hinge, robust, simpo, orpo or a plugin's"})
    objective_options: dict = field(default_factory=dict, metadata={
        "help": "the objective's hyperparameters, e.g. {beta: 0.1, label_smoothing: 0.1} for dpo"})


class PreferenceStage(Stage):
    """A stage trained with a preference objective, against the starting model where the objective needs one.

    Its objective is of the pairwise family unless a subclass sets another ``objective_family`` (``kto``).
    """

    headline_metric = "reward_accuracy"
    objective_family = PAIRWISE

    def encode(self, tokenizer: Any, rows: list[dict[str, Any]], what: str = "data") -> list[EncodedPair]:
        """The pairs of ``rows`` that fit ``max_length`` (:func:`keep_rows_that_fit`)."""
        max_length = self.options.max_length
        return keep_rows_that_fit(self.name, encode_each(rows, lambda row: encode_pair(tokenizer, row, max_length)),
                                  max_length, what)

    def reference(self, policy: torch.nn.Module, objective: Objective) -> ReferenceModel | None:
        """The reference the stage scores against: None for a reference-free objective."""
        return None if objective.reference_free else ReferenceModel(policy, objective.average_logps)

    def eval_pairs(self, tokenizer: Any, rows: list[dict[str, Any]] | None = None) -> list[EncodedPair]:
        """The held-out pairs (of ``rows``, by default :meth:`eval_rows`), in order."""
        rows = [row for row in (self.eval_rows() if rows is None else rows) if row_format(row) == "preference"]
        return self.encode(tokenizer, rows, "eval_data") if rows else []

    @torch.no_grad()
    def pair_logps(self, model: torch.nn.Module, tokenizer: Any, pairs: list[EncodedPair],
                   average: bool, reference: ReferenceModel | None = None) -> torch.Tensor:
        """(2P,) log-probs of P pairs (chosen then rejected, pair by pair), by the policy or ``reference``."""
        device = next(model.parameters()).device
        chosen, rejected = [], []
        size = self.options.batch_size
        with eval_mode(model):
            for start in range(0, len(pairs), size):
                batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + size],
                                                                    tokenizer.pad_token_id).items()}
                logps = reference.logps(model, batch) if reference else sequence_logps(model, batch, average)
                c, r = logps.float().cpu().chunk(2)
                chosen.append(c)
                rejected.append(r)
        return torch.cat(chosen + rejected)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any,
                 reference_logps: torch.Tensor | None = None) -> dict[str, float]:
        """Held-out ``reward_accuracy`` on pairs and greedy ``exact_match`` on rows with an ``answer``.

        ``reward_accuracy`` is the fraction of pairs whose chosen answer has the
        higher implicit reward: ``(policy - reference)`` of chosen above that of
        rejected; for a reference-free objective, the policy's log-prob (average
        per token for SimPO and ORPO) of chosen above rejected. ``logp_margin`` is
        the mean difference compared. Without ``reference_logps`` (the starting
        model, evaluated before its stage) the model is its own reference: every
        implicit reward is 0 and no pair is won.
        """
        metrics: dict[str, float] = {}
        objective = self.objective()
        rows = self.eval_rows()
        pairs = self.eval_pairs(tokenizer, rows)
        if pairs and not objective.reference_free and reference_logps is None:
            metrics.update(reward_accuracy=0.0, logp_margin=0.0)
        elif pairs:
            logps = self.pair_logps(model, tokenizer, pairs, objective.average_logps)  # (2P,)
            if reference_logps is not None:
                logps = logps - reference_logps
            chosen, rejected = logps.chunk(2)  # (P,), (P,)
            metrics.update(reward_accuracy=float((chosen > rejected).float().mean()),
                           logp_margin=float((chosen - rejected).mean()))
        answered = [{"prompt": row["prompt"], "answer": row["answer"], **({"level": row["level"]} if "level" in row
                     else {})} for row in rows if "answer" in row and "prompt" in row]
        if answered:
            metrics.update(exact_match(model, tokenizer, answered, self.options.max_new_tokens))
        return metrics

    def eval_reference_logps(self, model: torch.nn.Module, tokenizer: Any,
                             reference: ReferenceModel | None) -> torch.Tensor | None:
        """(2P,) reference log-probs of the held-out pairs, for :meth:`evaluate`; None without pairs or reference."""
        pairs = self.eval_pairs(tokenizer) if reference is not None else []
        return self.pair_logps(model, tokenizer, pairs, reference.average, reference) if pairs else None
