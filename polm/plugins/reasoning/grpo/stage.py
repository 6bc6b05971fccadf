"""The ``grpo`` stage: group relative policy optimisation on rewards computed from sampled completions.

The rows are prompts and the shared training loop drives them: for each
micro-batch of ``batch_size`` prompts, :class:`GRPOStep` samples
``num_generations`` completions per prompt with the KV cache
(:func:`polm.engine.rl.rollout.sample`), scores them with the weighted rewards,
turns the rewards into advantages within each prompt's group, and keeps the
result in a rollout buffer that serves ``num_iterations`` consecutive
optimizer steps, each a clipped policy update against the sampling policy
(see :mod:`polm.engine.rl.advantages` and :mod:`polm.engine.rl.losses` for
the objectives and papers).
On the steps that reuse a buffered rollout, the prompts the loop hands in are
not sampled.

Resume: checkpoints hold the weights, optimizer, scheduler and RNG state but
not the rollout buffer. A resumed run samples a fresh generation batch at its
first step, from the restored weights and RNG state. When the checkpoint falls
on a generation boundary (its step a multiple of ``num_iterations``, always the
case with the default 1), the resumed run repeats the uninterrupted one
exactly; otherwise it continues with a fresh rollout where the uninterrupted
run would have reused its buffer.

Logged each generation step (``metrics.jsonl``, averaged over ``log_every``):
``reward`` (weighted sum), ``reward/<name>`` (each reward before weighting),
``reward_std`` (mean within-group std), ``completion_length``,
``sampling_tokens_per_s`` (sampled tokens per second of generation, apart
from training), ``groups_kept`` (with dynamic sampling); each step:
``clip_fraction``, ``approx_kl`` (to the sampling policy; 0 on the first
update of a generation batch), ``entropy``, and ``kl`` when ``beta`` > 0.
``tokens_per_s`` of the loop counts prompt and completion tokens trained per
second of the whole step, sampling included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from polm.engine.data import Row, check_data_spec, load_rows
from polm.engine.errors import PolmError
from polm.engine.evaluation import generate
from polm.engine.rewards import parse_reward_weights, score_weighted
from polm.engine.rl.advantages import group_advantages, informative_groups, rloo_advantages
from polm.engine.rl.losses import clipped_policy_loss
from polm.engine.rl.reference import ReferenceModel
from polm.engine.rl.rollout import Rollout, completion_token_logps, sample
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.reasoning.grpo.options import GRPOOptions


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class GenerationBatch:
    """One micro-batch's sampled completions, ready for ``num_iterations`` updates.

    Attributes:
        rollout: the completions kept for training (None when dynamic sampling dropped every group).
        advantages: (N,) one per kept completion.
        ref_logps: (N, C) under the reference, when ``beta`` > 0.
        old_logps: (N, C) under the sampling policy, set by the first update.
        metrics: reward and sampling statistics, logged once.
        uses: updates made so far.
    """

    rollout: Rollout | None
    advantages: torch.Tensor | None
    ref_logps: torch.Tensor | None
    metrics: dict[str, float]
    old_logps: torch.Tensor | None = None
    uses: int = 0


@dataclass
class GRPOStep:
    """The loop's ``compute_loss`` for ``grpo``, holding the rollout buffer (one entry per micro-batch slot)."""

    options: GRPOOptions
    tokenizer: Any
    weights: dict[str, float]
    reference: ReferenceModel | None
    buffer: dict[int, GenerationBatch] = field(default_factory=dict)
    calls: int = 0
    trained_tokens: int = 0

    def generate(self, policy: torch.nn.Module, rows: list[Row]) -> GenerationBatch:
        """Sample, score and compute advantages for the prompts of ``rows``."""
        options, size = self.options, self.options.num_generations
        rollout = sample(extract_model_from_parallel(policy), self.tokenizer, [row["prompt"] for row in rows],
                         max_new_tokens=options.max_new_tokens, num_samples=size, temperature=options.temperature,
                         top_p=options.top_p, stop_strings=options.stop_strings, batch_size=len(rows) * size)
        repeated = [row for row in rows for _ in range(size)]
        total, per_reward = score_weighted(self.weights, repeated, rollout.texts, options.reward_options)
        rewards = torch.tensor(total).view(len(rows), size)  # (B, G)
        if options.advantage == "rloo":
            advantages = rloo_advantages(rewards)
        else:
            advantages = group_advantages(rewards, scale=options.loss_type != "dr_grpo")
        metrics = {"reward": _mean(total), "reward_std": float(rewards.std(-1).mean()),
                   "completion_length": float(rollout.completion_lengths.float().mean()),
                   "sampling_tokens_per_s": rollout.tokens_per_second,
                   **{f"reward/{name}": _mean(values) for name, values in per_reward.items()}}
        advantages = advantages.flatten()  # (N,)
        if options.dynamic_sampling:
            kept = informative_groups(rewards)  # (B,)
            metrics["groups_kept"] = float(kept.float().mean())
            if not kept.any():
                return GenerationBatch(None, None, None, metrics)
            rows_kept = kept.repeat_interleave(size).nonzero().flatten()
            rollout, advantages = rollout.select(rows_kept), advantages[rows_kept]
        ref_logps = None
        if self.reference is not None:
            ref_logps = self.reference.token_logps(policy, rollout, options.temperature)
        return GenerationBatch(rollout, advantages, ref_logps, metrics)

    def __call__(self, policy: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        slot = self.calls % self.options.grad_accum
        self.calls += 1
        entry = self.buffer.get(slot)
        fresh = entry is None
        if entry is None:
            entry = self.buffer[slot] = self.generate(policy, batch["rows"])
        metrics = dict(entry.metrics) if fresh else {}
        entry.uses += 1
        if entry.uses == self.options.num_iterations:
            del self.buffer[slot]
        if entry.rollout is None:  # every group had equal rewards: nothing to learn from this batch
            self.trained_tokens = 0
            return torch.zeros((), requires_grad=True), metrics
        rollout = entry.rollout
        logps, entropy = completion_token_logps(policy, rollout, self.options.temperature, with_entropy=True)
        if entry.old_logps is None:  # the first update: the policy is still the sampling policy
            entry.old_logps = logps.detach()
        mask = rollout.completion_mask.to(logps.device)
        loss, loss_metrics = clipped_policy_loss(
            logps, entry.old_logps, entry.advantages.to(logps.device), mask,
            epsilon_low=self.options.epsilon, epsilon_high=self.options.epsilon_high,
            loss_type=self.options.loss_type, ref_logps=entry.ref_logps, beta=self.options.beta,
            max_completion_length=self.options.max_new_tokens,
        )
        self.trained_tokens = int(rollout.attention_mask.sum())
        metrics.update({key: float(value) for key, value in loss_metrics.items()})
        metrics["entropy"] = float(entropy.detach().sum() / mask.sum().clamp(min=1))
        return loss, metrics


class GRPOStage(Stage):
    """Sample groups of completions, reward them, push the policy toward the better ones of each group."""

    Options = GRPOOptions

    def check(self) -> None:
        from polm.engine.plugins import registry

        check_data_spec(self.options.data, "data")
        if self.options.eval_data is not None:
            check_data_spec(self.options.eval_data, "eval_data")
        weights = parse_reward_weights(self.options.rewards)
        rewards = registry("rewards")
        for name in weights:
            rewards.get(name)
        stray = sorted(set(self.options.reward_options) - set(weights))
        if stray:
            raise PolmError(f"option 'reward_options' sets options of {', '.join(stray)}, which 'rewards' does not "
                            f"list ({', '.join(weights)}); add them to 'rewards' or remove their options")

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Held-out greedy ``reward`` (weighted) and ``reward/<name>``, and ``exact_match`` on rows with answers."""
        rows = [row for row in self.eval_rows() if "prompt" in row]
        if not rows:
            return {}
        completions = generate(model, tokenizer, [row["prompt"] for row in rows], self.options.max_new_tokens,
                               stop_strings=self.options.stop_strings)
        total, per_reward = score_weighted(parse_reward_weights(self.options.rewards), rows, completions,
                                           self.options.reward_options)
        metrics = {"reward": _mean(total), **{f"reward/{name}": _mean(values) for name, values in per_reward.items()}}
        return {**metrics, **super().evaluate(model, tokenizer)}

    def run(self, context: StageContext) -> StageOutput:
        rows = [row for row in load_rows(self.options.data, "train") if "prompt" in row]
        if not rows:
            raise PolmError(f"stage '{self.name}': option 'data' has no rows with a 'prompt' to sample from")
        reference = ReferenceModel(context.model) if self.options.beta > 0 else None
        step = GRPOStep(self.options, context.tokenizer, parse_reward_weights(self.options.rewards), reference)
        task = TrainingTask(
            rows=rows,
            collate=lambda items: {"rows": items},
            compute_loss=step,
            evaluate=lambda model: self.evaluate(model, context.tokenizer),
            count_tokens=lambda batch: step.trained_tokens,
        )
        return train(self.name, context, self.options, task)
