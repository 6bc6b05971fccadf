"""The ``online_dpo`` stage: preference pairs sampled from the policy as it trains, labelled by a reward.

Each step samples two completions of each of its ``batch_size`` prompts from
the current policy, scores both (a reward model, registered rewards such as
``judge``, or both; see :mod:`polm.plugins.alignment.scoring`), makes the
higher-scored one ``chosen`` and trains on the pairs with a registered
pairwise objective, exactly as ``dpo`` does. Prompts whose two completions
score the same teach nothing and are skipped; a step with no pair left takes
a zero-gradient step. Guo et al. 2024, "Direct Language Model Alignment from
Online AI Feedback" (OAIF), https://arxiv.org/abs/2402.04792.

The pairs are re-encoded from the completions' text as ``dpo`` encodes its
data, so the chat template's end-of-turn closes every answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from polm.engine.data import Row, load_rows
from polm.engine.evaluation import generate
from polm.engine.options import StageOptions
from polm.engine.rl.logps import sequence_logps
from polm.engine.rl.reference import ReferenceModel
from polm.engine.stage import StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.alignment.logps import collate_pairs, encode_pair
from polm.plugins.alignment.objective_lookup import Objective
from polm.plugins.alignment.preference import PreferenceStage
from polm.plugins.alignment.scoring import RewardOptions, RewardSource

SAMPLES = 2  # completions per prompt: one pair


@dataclass
class OnlineDPOOptions(StageOptions, RewardOptions):
    """Options of ``online_dpo``; ``batch_size`` is prompts per step, ``max_new_tokens`` the completion length."""

    data: Any = field(default=None, metadata={
        "help": "prompt rows with the fields the rewards need (e.g. {prompt, answer}): 'polm:<name>', JSONL, list"})
    objective: str = field(default="dpo", metadata={
        "help": "a registered pairwise objective: dpo, ipo, hinge, robust, simpo, orpo or a plugin's"})
    objective_options: dict = field(default_factory=dict, metadata={
        "help": "the objective's hyperparameters, e.g. {beta: 0.1} for dpo"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the two completions"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("option 'data' is required (prompt rows, e.g. 'polm:arithmetic')")
        self.check_rewards()
        if self.temperature <= 0:
            raise ValueError("'temperature' must be positive: two greedy completions of a prompt are the same")


@dataclass
class OnlineDPOStep:
    """The loop's ``compute_loss`` for ``online_dpo``."""

    options: OnlineDPOOptions
    tokenizer: Any
    rewards: RewardSource
    objective: Objective
    reference: ReferenceModel | None
    trained_tokens: int = 0

    @torch.no_grad()
    def pairs(self, policy: torch.nn.Module, rows: list[Row]) -> tuple[list[Row], dict[str, float]]:
        """Preference rows from two sampled completions per prompt, ties dropped, and sampling statistics."""
        options = self.options
        texts = generate(extract_model_from_parallel(policy), self.tokenizer, [row["prompt"] for row in rows],
                         options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                         num_samples=SAMPLES)
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

    def __call__(self, policy: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        rows, stats = self.pairs(policy, batch["rows"])
        encoded = [pair for pair in (encode_pair(self.tokenizer, row, self.options.max_length) for row in rows)
                   if pair is not None]
        if not encoded:  # every pair tied: a step that changes nothing
            self.trained_tokens = 0
            trainable = next(p for p in policy.parameters() if p.requires_grad)
            return trainable.sum() * 0.0, stats
        device = next(policy.parameters()).device
        pairs = {key: value.to(device) for key, value in collate_pairs(encoded, self.tokenizer.pad_token_id).items()}
        self.trained_tokens = int(pairs["attention_mask"].sum())
        chosen, rejected = sequence_logps(policy, pairs, self.objective.average_logps).chunk(2)  # (P,), (P,)
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            ref_chosen, ref_rejected = self.reference.logps(policy, pairs).chunk(2)
        loss, metrics = self.objective.fn(chosen, rejected, ref_chosen, ref_rejected, **self.options.objective_options)
        return loss, {**metrics, **stats, "chosen_logps": float(chosen.detach().mean()),
                      "rejected_logps": float(rejected.detach().mean())}


class OnlineDPOStage(PreferenceStage):
    """DPO on pairs the policy samples and a reward labels, step by step."""

    Options = OnlineDPOOptions
    headline_metric = "reward"

    def check(self) -> None:
        super().check()
        RewardSource(self.options).check()

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
        task = TrainingTask(
            rows=load_rows(options.data, "train"),
            collate=lambda rows: {"rows": rows},
            compute_loss=step,
            evaluate=lambda policy: self.evaluate(policy, tokenizer, eval_reference),
            count_tokens=lambda batch: step.trained_tokens,
        )
        return train(self.name, context, options, task)
