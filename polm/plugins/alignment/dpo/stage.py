"""The preference stages ``dpo``, ``simpo`` and ``orpo``: one stage, any pairwise objective.

Each step scores the chosen and rejected answers of a batch of pairs in one
forward pass, scores them under the reference model when the objective needs
one (see :mod:`polm.plugins.alignment.dpo.reference`), and hands the four
(B,) log-prob tensors to the objective named by ``objective``, looked up in the
objectives registry at run time so that third-party objectives work alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState

from polm.engine.data import check_data_spec, load_rows, row_format
from polm.engine.encoding import IGNORE_INDEX, keep_rows_that_fit
from polm.engine.evaluation import exact_match
from polm.engine.options import StageOptions
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.alignment.dpo.objective import Objective, check_objective_options, find_objective
from polm.plugins.alignment.dpo.reference import ReferenceModel, eval_mode
from polm.plugins.alignment.logps import EncodedPair, collate_pairs, encode_pair, sequence_logps


@dataclass
class PreferenceOptions(StageOptions):
    """Options of ``dpo`` (and of ``simpo`` and ``orpo``, which change the default objective, and for simpo the lr)."""

    data: Any = field(default=None, metadata={
        "help": "preference rows {prompt, chosen, rejected}: 'polm:<name>', a JSONL path, or a list"})
    objective: str = field(default="dpo", metadata={
        "help": "a registered pairwise objective: dpo, ipo, hinge, robust, simpo, orpo or a plugin's"})
    objective_options: dict = field(default_factory=dict, metadata={
        "help": "the objective's hyperparameters, e.g. {beta: 0.1, label_smoothing: 0.1} for dpo"})
    precompute_ref: bool = field(default=False, metadata={
        "help": "score every pair under the reference model once before training, then drop its copy "
                "(ignored by reference-free objectives)"})
    nll_weight: float = field(default=0.0, metadata={
        "help": "weight of the chosen answers' per-token negative log-likelihood added to the objective's loss "
                "(RPO, Pang et al. 2024; TRL's rpo_alpha): it keeps the chosen answers likely, which a "
                "pairwise loss alone may lower while it widens the margin"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("option 'data' is required (preference rows, e.g. 'polm:arithmetic-prefs')")
        if self.nll_weight < 0:
            raise ValueError(f"'nll_weight' must be non-negative, got {self.nll_weight}")


@dataclass
class SimPOOptions(PreferenceOptions):
    """Options of ``simpo``: ``dpo`` with the reference-free SimPO objective and a lower learning rate by default.

    From the quickstart SFT model (200 steps of 32 pairs of polm:arithmetic-prefs), SimPO at dpo's lr 1e-4
    lowers held-out reward_accuracy 0.937 -> 0.927 and exact_match 0.77 -> 0.67; at 2e-5 they end at 0.947
    and 0.76.
    """

    objective: str = field(default="simpo", metadata={"help": "a registered pairwise objective (default simpo)"})
    lr: float = field(default=2e-5, metadata={
        "help": "peak learning rate: lower than dpo's, since no reference holds SimPO near the starting model "
                "(its authors find the learning rate its most sensitive setting)"})


@dataclass
class ORPOOptions(PreferenceOptions):
    """Options of ``orpo``: ``dpo`` with the reference-free ORPO objective by default."""

    objective: str = field(default="orpo", metadata={"help": "a registered pairwise objective (default orpo)"})


class PreferenceStage(Stage):
    """Train on preference pairs with a pairwise objective, against the starting model where it needs one."""

    Options = PreferenceOptions
    headline_metric = "reward_accuracy"

    def check(self) -> None:
        check_data_spec(self.options.data, "data")
        if self.options.eval_data is not None:
            check_data_spec(self.options.eval_data, "eval_data")
        check_objective_options(self.objective(), self.options.objective_options)

    def objective(self) -> Objective:
        """The pairwise objective named by ``objective``, looked up now (plugins may have changed)."""
        return find_objective(self.options.objective)

    def encode(self, tokenizer: Any, rows: list[dict[str, Any]], what: str = "data") -> list[EncodedPair]:
        """The pairs of ``rows`` that fit ``max_length`` (:func:`keep_rows_that_fit`)."""
        max_length = self.options.max_length
        return keep_rows_that_fit(self.name, [encode_pair(tokenizer, row, max_length) for row in rows],
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

    def training_task(self, context: StageContext, objective: Objective) -> TrainingTask:
        """Pairs, collation, the objective's loss and held-out evaluation, with the reference set up."""
        model, tokenizer, options = context.model, context.tokenizer, self.options
        pairs = self.encode(tokenizer, load_rows(options.data, "train"))
        reference = self.reference(model, objective)
        eval_reference = self.eval_reference_logps(model, tokenizer, reference)
        if reference is not None and options.precompute_ref:
            pairs = reference.precompute(model, pairs, tokenizer.pad_token_id, options.batch_size,
                                         PartialState().device)
            reference.release()

        def compute_loss(policy: torch.nn.Module, batch: dict[str, Any]):
            logps = sequence_logps(policy, batch, objective.average_logps)  # (2B,)
            chosen, rejected = logps.chunk(2)  # (B,), (B,)
            ref_chosen = ref_rejected = None
            if reference is not None:
                ref = batch["ref_logps"] if "ref_logps" in batch else reference.logps(policy, batch)  # (2B,)
                ref_chosen, ref_rejected = ref.chunk(2)
            loss, metrics = objective.fn(chosen, rejected, ref_chosen, ref_rejected, **options.objective_options)
            if options.nll_weight:
                chosen_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).chunk(2)[0]  # (B,)
                nll = -(chosen if objective.average_logps else chosen / chosen_tokens).mean()
                loss = loss + options.nll_weight * nll
                metrics = {**metrics, "chosen_nll": float(nll.detach())}
            return loss, {**metrics, "chosen_logps": float(chosen.detach().mean()),
                          "rejected_logps": float(rejected.detach().mean())}

        return TrainingTask(
            rows=pairs,
            collate=lambda items: collate_pairs(items, tokenizer.pad_token_id),
            compute_loss=compute_loss,
            evaluate=lambda policy: self.evaluate(policy, tokenizer, eval_reference),
        )

    def run(self, context: StageContext) -> StageOutput:
        objective = self.objective()  # at run time: plugins may have changed
        return train(self.name, context, self.options, self.training_task(context, objective))


class SimPOStage(PreferenceStage):
    """``dpo`` with SimPO by default: reference-free, length-normalised, at a lower learning rate."""

    Options = SimPOOptions


class ORPOStage(PreferenceStage):
    """``dpo`` with ORPO by default: SFT plus an odds-ratio term, reference-free."""

    Options = ORPOOptions
