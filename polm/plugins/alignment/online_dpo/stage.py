"""The ``online_dpo`` stage: preference pairs sampled from the policy as it trains, labelled by a reward.

Each step samples two completions of each of its ``batch_size`` prompts from
the current policy, scores both (a reward model, registered rewards such as
``judge``, or both; see :mod:`polm.plugins.alignment.scoring`), makes the
higher-scored one ``chosen`` and trains on the pairs with a registered
pairwise objective, exactly as ``dpo`` does. Prompts whose two completions
score the same teach nothing and are skipped; a step with no pair left takes
a zero-gradient step. Guo et al. 2024, "Direct Language Model Alignment from
Online AI Feedback" (OAIF), https://arxiv.org/abs/2402.04792.

The stage is an :class:`~polm.engine.trainer.OnPolicyTask` with one update per
generation batch: :meth:`OnlineDPOStep.collect` samples, labels and encodes
the pairs of a step's prompts and scores them under the reference; the loss of
each micro-batch is its pairs' mean, normalised over the pairs of the whole
step (:mod:`polm.engine.rl.on_policy`).

The pairs are re-encoded from the completions' text as ``dpo`` encodes its
data, so the chat template's end-of-turn closes every answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from polm.engine.data import Row
from polm.engine.evaluation import generate
from polm.engine.objectives import Objective
from polm.engine.option_groups import DataOptions, RewardOptions, SamplingOptions
from polm.engine.options import StageOptions
from polm.engine.rl.buffer import MicroBatch, RolloutBuffer
from polm.engine.rl.logps import sequence_logps
from polm.engine.rl.losses import zero_loss
from polm.engine.rl.reference import ReferenceModel
from polm.engine.stage import StageContext, StageOutput
from polm.engine.trainer import OnPolicyTask, train
from polm.plugins.alignment.logps import collate_pairs, encode_pair, precompute_reference_logps
from polm.plugins.alignment.preference import PairwiseObjectiveOptions, PreferenceStage
from polm.plugins.alignment.scoring import RewardSource

SAMPLES = 2  # completions per prompt: one pair


@dataclass
class OnlineDPOOptions(StageOptions, DataOptions, SamplingOptions, RewardOptions, PairwiseObjectiveOptions):
    """Options of ``online_dpo``; ``data`` holds prompt rows with the fields the rewards need (e.g.
    ``{prompt, answer}``), ``batch_size`` is prompts per step, ``max_new_tokens`` the completion length."""


@dataclass
class OnlineDPOStep:
    """The ``collect`` and ``loss`` of ``online_dpo``'s :class:`~polm.engine.trainer.OnPolicyTask`.

    Buffer field: ``pairs``, the P encoded pairs (with their reference log-probs when the objective has a
    reference); each pair weighs 1, as the objectives are means over pairs.
    """

    options: OnlineDPOOptions
    tokenizer: Any
    rewards: RewardSource
    objective: Objective
    reference: ReferenceModel | None

    def pairs(self, policy: torch.nn.Module, rows: list[Row]) -> tuple[list[Row], dict[str, float]]:
        """Preference rows from two sampled completions per prompt, ties dropped, and sampling statistics."""
        options = self.options
        texts = generate(extract_model_from_parallel(policy), self.tokenizer, [row["prompt"] for row in rows],
                         options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                         num_samples=SAMPLES, stop_strings=options.stop_strings)
        scores = self.rewards([row for row in rows for _ in range(SAMPLES)], texts).view(-1, SAMPLES)  # (B, 2)
        pairs = []
        for row, (first, second), (score_first, score_second) in zip(rows, zip(texts[::2], texts[1::2]),
                                                                    scores.tolist()):
            if score_first != score_second:
                chosen, rejected = (first, second) if score_first > score_second else (second, first)
                pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
        decided = scores[:, 0] != scores[:, 1]
        stats = {"score": float(scores.mean()), "pair_fraction": float(decided.float().mean())}
        if decided.any():
            stats.update(chosen_score=float(scores[decided].max(-1).values.mean()),
                         rejected_score=float(scores[decided].min(-1).values.mean()))
        return pairs, stats

    def collect(self, policy: torch.nn.Module, rows: list[Row]) -> RolloutBuffer:
        """The encoded pairs of ``rows``' prompts, scored under the reference, for one update."""
        rows, stats = self.pairs(policy, rows)
        encoded = [pair for pair in (encode_pair(self.tokenizer, row, self.options.max_length) for row in rows)
                   if pair is not None]
        if self.reference is not None and encoded:
            encoded = precompute_reference_logps(self.reference, policy, encoded, self.tokenizer.pad_token_id,
                                                 self.options.batch_size, next(policy.parameters()).device)
        return RolloutBuffer({"pairs": encoded}, torch.ones(len(encoded)), [list(range(len(encoded)))], stats)

    def loss(self, policy: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float], int]:
        """The objective's loss on the pairs of ``batch``, a mean over them."""
        if not batch.size:  # every pair tied: a step that changes nothing
            return zero_loss(policy), {}, 0
        device = next(policy.parameters()).device
        pairs = {key: value.to(device) for key, value in
                 collate_pairs(batch["pairs"], self.tokenizer.pad_token_id).items()}
        chosen, rejected = sequence_logps(policy, pairs, self.objective.average_logps).chunk(2)  # (P,), (P,)
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            ref_chosen, ref_rejected = pairs["ref_logps"].chunk(2)
        loss, metrics = self.objective.fn(chosen, rejected, ref_chosen, ref_rejected, **self.options.objective_options)
        return loss, {**metrics, "chosen_logps": float(chosen.detach().mean()),
                      "rejected_logps": float(rejected.detach().mean())}, int(pairs["attention_mask"].sum())


class OnlineDPOStage(PreferenceStage):
    """DPO on pairs the policy samples and a reward labels, step by step."""

    Options = OnlineDPOOptions
    headline_metric = "reward"

    def evaluate(self, model: torch.nn.Module, tokenizer: Any,
                 reference_logps: torch.Tensor | None = None) -> dict[str, float]:
        """``dpo``'s held-out metrics (pairs, exact_match) and the mean ``reward`` of greedy completions."""
        metrics = super().evaluate(model, tokenizer, reference_logps)
        rows = [row for row in self.eval_rows() if "prompt" in row]
        if rows:
            metrics.update(RewardSource(self.options).held_out(model, tokenizer, rows, self.options.max_new_tokens))
        return metrics

    def run(self, context: StageContext) -> StageOutput:
        model, tokenizer, options = context.model, context.tokenizer, self.options
        objective = self.objective()
        reference = self.reference(model, objective)
        eval_reference = self.eval_reference_logps(model, tokenizer, reference)
        step = OnlineDPOStep(options, tokenizer, RewardSource(options), objective, reference)
        task = OnPolicyTask(
            rows=self.rows(),
            collect=step.collect,
            loss=step.loss,
            evaluate=lambda policy: self.evaluate(policy, tokenizer, eval_reference),
        )
        return train(self.name, context, options, task)
