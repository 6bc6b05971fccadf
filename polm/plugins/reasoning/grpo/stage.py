"""The ``grpo`` stage: group relative policy optimisation on rewards computed from sampled completions.

The rows are prompts and the shared training loop drives them as an
:class:`~polm.engine.trainer.OnPolicyTask`: for each generation batch
(``batch_size`` prompts per micro-batch, ``grad_accum`` micro-batches),
:meth:`GRPOStep.collect` samples ``num_generations`` completions per prompt
with the KV cache (:func:`polm.engine.rl.rollout.sample`), scores them with
the weighted rewards, turns the rewards into advantages within each prompt's
group and computes the log-probs the updates compare against; the loop then
makes ``num_iterations`` optimizer steps from that rollout buffer, each a
clipped policy update against the sampling policy (see
:mod:`polm.engine.rl.advantages` and :mod:`polm.engine.rl.losses` for the
objectives and papers). The policy loss is the ``objective`` of the
``policy_gradient`` family (:mod:`polm.engine.objectives`). The steps that
reuse a buffered rollout leave their own prompts unused. Each update's loss
is normalised over the completions (``grpo``, ``dr_grpo``) or completion
tokens (``dapo``: a ``token_level`` objective) of all its micro-batches, so
``grad_accum`` changes the memory an update needs, not its gradient
(:mod:`polm.engine.rl.on_policy`).

Resume: checkpoints hold the rollout buffer with the updates made from it, so
a run resumed between two updates of a generation batch repeats the
uninterrupted one exactly.

Logged each generation batch (``metrics.jsonl``, averaged over ``log_every``):
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

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from polm.engine.data import Row
from polm.engine.errors import PolmError
from polm.engine.evaluation import generate
from polm.engine.objectives import POLICY_GRADIENT, Objective
from polm.engine.rewards import parse_reward_weights, score_weighted
from polm.engine.rl.advantages import group_advantages, informative_groups, rloo_advantages
from polm.engine.rl.buffer import MicroBatch, RolloutBuffer
from polm.engine.rl.losses import zero_loss
from polm.engine.rl.reference import ReferenceModel
from polm.engine.rl.rollout import completion_token_logps, in_chunks, sample
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import OnPolicyTask, train
from polm.plugins.reasoning.grpo.options import GRPOOptions


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class GRPOStep:
    """The ``collect`` and ``loss`` of ``grpo``'s :class:`~polm.engine.trainer.OnPolicyTask`.

    Buffer fields (N kept completions of C tokens at most): ``rollout``; ``advantages`` (N,); ``ref_logps``
    (N, C) under the reference, when ``beta`` > 0; ``old_logps`` (N, C) under the sampling policy, when
    ``num_iterations`` > 1 (with one update the policy *is* the sampling policy, and its own detached
    log-probs stand in).
    """

    options: GRPOOptions
    tokenizer: Any
    weights: dict[str, float]
    reference: ReferenceModel | None
    objective: Objective

    def collect(self, policy: torch.nn.Module, rows: list[Row]) -> RolloutBuffer:
        """Sample, score and compute advantages for the prompts of ``rows``; the buffer's ``num_iterations``
        updates each cover every kept completion."""
        options, size = self.options, self.options.num_generations
        chunk = options.batch_size * size  # completions sampled and scored together: one micro-batch's
        rollout = sample(extract_model_from_parallel(policy), self.tokenizer, [row["prompt"] for row in rows],
                         max_new_tokens=options.max_new_tokens, num_samples=size, temperature=options.temperature,
                         top_p=options.top_p, stop_strings=options.stop_strings, batch_size=chunk)
        repeated = [row for row in rows for _ in range(size)]
        total, per_reward = score_weighted(self.weights, repeated, rollout.texts, options.reward_options)
        rewards = torch.tensor(total).view(len(rows), size)  # (B, G)
        if options.advantage == "rloo":
            advantages = rloo_advantages(rewards)
        else:
            advantages = group_advantages(rewards, scale=options.objective != "dr_grpo")  # Dr. GRPO: no std
        metrics = {"reward": _mean(total), "reward_std": float(rewards.std(-1).mean()),
                   "completion_length": float(rollout.completion_lengths.float().mean()),
                   "sampling_tokens_per_s": rollout.tokens_per_second,
                   **{f"reward/{name}": _mean(values) for name, values in per_reward.items()}}
        advantages = advantages.flatten()  # (N,)
        if options.dynamic_sampling:
            kept = informative_groups(rewards)  # (B,)
            metrics["groups_kept"] = float(kept.float().mean())
            if not kept.any():  # every group had equal rewards: nothing to learn from this batch
                return RolloutBuffer({}, torch.zeros(0), [[] for _ in range(options.num_iterations)], metrics)
            rows_kept = kept.repeat_interleave(size).nonzero().flatten()
            rollout, advantages = rollout.select(rows_kept), advantages[rows_kept]
        fields: dict[str, Any] = {"rollout": rollout, "advantages": advantages}
        if self.reference is not None:
            fields["ref_logps"] = in_chunks(
                lambda part: self.reference.token_logps(policy, part, options.temperature), rollout, chunk)
        if options.num_iterations > 1:
            fields["old_logps"] = in_chunks(
                lambda part: completion_token_logps(policy, part, options.temperature)[0], rollout, chunk)
        # a token-level objective (dapo) averages over every completion token of an update, the others over
        # its completions
        weights = (rollout.completion_lengths.float() if self.objective.token_level
                   else torch.ones(len(rollout.texts)))
        every = list(range(len(rollout.texts)))
        return RolloutBuffer(fields, weights, [every] * options.num_iterations, metrics)

    def loss(self, policy: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float], int]:
        """The objective's policy loss of ``batch``, reduced over its own completions."""
        if not batch.size:  # dynamic sampling kept no group here
            return zero_loss(policy), {}, 0
        rollout = batch["rollout"]
        logps, entropy = completion_token_logps(policy, rollout, self.options.temperature, with_entropy=True)
        device = logps.device
        old_logps = batch.get("old_logps")
        old_logps = logps.detach() if old_logps is None else old_logps.to(device)
        ref_logps = batch.get("ref_logps")
        mask = rollout.completion_mask.to(device)
        loss, loss_metrics = self.objective.fn(
            logps, old_logps, batch["advantages"].to(device), mask,
            ref_logps=None if ref_logps is None else ref_logps.to(device), beta=self.options.beta,
            epsilon_low=self.options.epsilon, epsilon_high=self.options.epsilon_high,
            max_completion_length=self.options.max_new_tokens, **self.options.objective_options,
        )
        metrics = {key: float(value) for key, value in loss_metrics.items()}
        metrics["entropy"] = float(entropy.detach().sum() / mask.sum().clamp(min=1))
        return loss, metrics, int(rollout.attention_mask.sum())


class GRPOStage(Stage):
    """Sample groups of completions, reward them, push the policy toward the better ones of each group."""

    Options = GRPOOptions
    objective_family = POLICY_GRADIENT

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
        rows = [row for row in self.rows() if "prompt" in row]
        if not rows:
            raise PolmError(f"stage '{self.name}': option 'data' has no rows with a 'prompt' to sample from")
        reference = ReferenceModel(context.model) if self.options.beta > 0 else None
        step = GRPOStep(self.options, context.tokenizer, parse_reward_weights(self.options.rewards), reference,
                        self.objective())
        task = OnPolicyTask(
            rows=rows,
            collect=step.collect,
            loss=step.loss,
            evaluate=lambda model: self.evaluate(model, context.tokenizer),
        )
        return train(self.name, context, self.options, task)
