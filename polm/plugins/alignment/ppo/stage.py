"""The ``ppo`` stage: RLHF with a value head, a per-token KL penalty to the starting model and GAE.

Each rollout samples ``samples`` completions for each of the ``batch_size``
prompts of a step, scores them (a reward model and/or registered rewards, see
:mod:`polm.plugins.alignment.scoring`), and turns the score into per-token
rewards with the KL penalty ``-kl_coef (logp - ref_logp)`` (the reference is the
starting model: a frozen copy, or the LoRA policy with its adapters disabled).
GAE on the value head's estimates gives advantages and returns. With
``prompt_baseline`` each score first loses the mean score of the other samples
of its prompt (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
Style Optimization for Learning from Human Feedback in LLMs",
https://arxiv.org/abs/2402.14740): a Bradley–Terry reward model is trained on
score differences within a prompt, so its scores carry an arbitrary offset per
prompt, which the value head would otherwise have to learn before the
advantages say which sample of a prompt was better. The rollout
is then replayed for ``ppo_epochs`` epochs of ``minibatches`` minibatches, one
optimizer step each, with the policy loss of the ``objective`` (a token-level
``policy_gradient`` objective; by default ``dapo``, the engine's clipped
surrogate :func:`polm.engine.rl.losses.clipped_policy_loss` averaged over
tokens) and the clipped value loss of :mod:`polm.plugins.alignment.ppo.loss`.

The stage is an :class:`~polm.engine.trainer.OnPolicyTask`, and the training
loop's steps are those minibatch updates: a step collects a new rollout from
its own prompts (``batch_size`` per micro-batch, ``grad_accum`` micro-batches)
when the previous rollout is used up, and the ``ppo_epochs * minibatches - 1``
steps that replay a rollout leave their prompts unused. So ``max_steps``
counts updates, and a rollout is sampled every ``ppo_epochs * minibatches``
steps. With ``grad_accum`` each minibatch is cut into that many micro-batches;
both losses are token means, normalised over the completion tokens of the whole
minibatch (:mod:`polm.engine.rl.on_policy`), so the gradient does not depend on
the cut.

Resume: each checkpoint holds the policy, the value head (``value_head/``) and
the rollout buffer of every process with its position (``rollout_buffer.pt``),
so a run resumed in the middle of a rollout replays the same minibatches in the
same order and continues exactly. The trained value head is also written to the
stage folder's ``value_head/``; ``final/`` holds the policy alone, a plain
transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel

from polm.engine.data import Row
from polm.engine.errors import PolmError
from polm.engine.objectives import POLICY_GRADIENT, Objective
from polm.engine.option_groups import DataOptions, RewardOptions, SamplingOptions
from polm.engine.options import StageOptions
from polm.engine.rl.advantages import gae, rloo_advantages, whiten
from polm.engine.rl.buffer import MicroBatch, RolloutBuffer
from polm.engine.rl.reference import ReferenceModel
from polm.engine.rl.rollout import Rollout, completion_token_logps, in_chunks, sample
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import OnPolicyTask, train
from polm.plugins.alignment.ppo.loss import kl_penalised_rewards, ppo_value_loss
from polm.plugins.alignment.ppo.value_head import ValueHead, hidden_size, last_hidden_states
from polm.plugins.alignment.scoring import RewardSource


@dataclass
class PPOOptions(StageOptions, DataOptions, SamplingOptions, RewardOptions):
    """Options of ``ppo``; ``data`` holds prompt rows with the fields the rewards need (e.g. ``{prompt, answer}``),
    ``batch_size`` is prompts per rollout, ``max_new_tokens`` the completion length."""

    samples: int = field(default=1, metadata={"help": "completions sampled per prompt in a rollout", "min": 1})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout", "min": 1})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass over a rollout", "min": 1})
    clip_range: float = field(default=0.2, metadata={"help": "PPO's epsilon for the policy ratio", "above": 0})
    objective: str = field(default="dapo", metadata={
        "help": "a registered token-level policy_gradient objective: dapo (the clipped surrogate's token mean, "
                "PPO's own reduction) or a plugin's"})
    objective_options: dict = field(default_factory=dict, metadata={"help": "the objective's keyword options"})
    value_clip_range: float = field(default=0.2, metadata={
        "help": "how far a value may move from its rollout estimate", "above": 0})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss", "min": 0})
    kl_coef: float = field(default=0.05, metadata={
        "help": "weight of the per-token KL penalty to the starting model", "min": 0})
    gamma: float = field(default=1.0, metadata={"help": "discount per token", "above": 0, "max": 1})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda", "above": 0, "max": 1})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages over each rollout"})
    prompt_baseline: bool = field(default=False, metadata={
        "help": "subtract from each score the mean score of the other samples of its prompt (RLOO's baseline; "
                "needs samples >= 2): removes the per-prompt offset a Bradley–Terry reward model leaves arbitrary"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_baseline and self.samples < 2:
            raise ValueError(f"'prompt_baseline' compares the samples of a prompt: set 'samples' to 2 or more, "
                             f"got {self.samples}")
        if (self.batch_size * self.samples) % self.minibatches:
            raise ValueError(f"'minibatches' ({self.minibatches}) must divide batch_size * samples "
                             f"({self.batch_size * self.samples})")


@dataclass
class PPOStep:
    """The ``collect`` and ``loss`` of ``ppo``'s :class:`~polm.engine.trainer.OnPolicyTask`.

    Buffer fields (N completions of C tokens at most, on the CPU): ``rollout``; ``old_logps``, ``old_values``,
    ``advantages``, ``returns``: (N, C) at sampling time. Each sample weighs its completion tokens, as both
    losses are token means.
    """

    options: PPOOptions
    tokenizer: Any
    rewards: RewardSource
    reference: ReferenceModel
    value_head: ValueHead
    objective: Objective

    def forward(self, policy: torch.nn.Module, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) log-probs of the sampled tokens and (N, C) values before each, from one forward pass."""
        with last_hidden_states(extract_model_from_parallel(policy)) as captured:
            logps, _ = completion_token_logps(policy, rollout, self.options.temperature)
        width = rollout.completion_ids.shape[1]
        values = self.value_head(captured[-1][:, -width - 1: -1])  # (N, C): the state before each token
        return logps, values * rollout.completion_mask.to(values.device)

    def collect(self, policy: torch.nn.Module, rows: list[Row]) -> RolloutBuffer:
        """Sample, score and compute advantages for the prompts of ``rows``; the updates are ``ppo_epochs``
        shuffles of the rollout, each cut into ``minibatches``."""
        options = self.options
        chunk = options.batch_size * options.samples  # completions scored together: one micro-batch's prompts'
        rollout = sample(extract_model_from_parallel(policy), self.tokenizer, [row["prompt"] for row in rows],
                         num_samples=options.samples, max_new_tokens=options.max_new_tokens,
                         temperature=options.temperature, top_p=options.top_p, stop_strings=options.stop_strings)
        scores = self.rewards([row for row in rows for _ in range(options.samples)], rollout.texts)  # (N,)
        if options.prompt_baseline:
            shaped = rloo_advantages(scores.view(-1, options.samples)).flatten()  # (N,)
        else:
            shaped = scores
        old_logps, old_values = (tensor.cpu() for tensor in in_chunks(lambda part: self.forward(policy, part),
                                                                       rollout, chunk))
        ref_logps = in_chunks(lambda part: self.reference.token_logps(policy, part, options.temperature),
                              rollout, chunk).cpu()
        mask = rollout.completion_mask.float()
        rewards = kl_penalised_rewards(shaped, old_logps, ref_logps, mask, options.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, options.gamma, options.lam)
        if options.whiten_advantages:
            advantages = whiten(advantages, mask)
        size = len(rollout.texts) // options.minibatches
        updates = [permutation[start: start + size].tolist() for _ in range(options.ppo_epochs)
                   for permutation in [torch.randperm(len(rollout.texts))]
                   for start in range(0, len(rollout.texts), size)]
        kl = ((old_logps - ref_logps) * mask).sum(-1)  # (N,) per completion
        metrics = {"score": float(scores.mean()), "score_std": float(scores.std()) if len(scores) > 1 else 0.0,
                   "kl": float(kl.mean()), "non_score_reward": float(-options.kl_coef * kl.mean()),
                   "completion_length": float(mask.sum(-1).mean()),
                   "sampling_tokens_per_s": rollout.tokens_per_second}
        fields = {"rollout": rollout, "old_logps": old_logps, "old_values": old_values, "advantages": advantages,
                  "returns": returns}
        return RolloutBuffer(fields, mask.sum(-1), updates, metrics)

    def loss(self, policy: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float], int]:
        """``policy_loss + vf_coef * value_loss`` on ``batch``, both token means."""
        rollout = batch["rollout"]
        logps, values = self.forward(policy, rollout)
        device = logps.device
        mask = rollout.completion_mask.to(device).float()
        policy_loss, policy_metrics = self.objective.fn(  # the KL penalty is in the rewards: no KL term here
            logps, batch["old_logps"].to(device), batch["advantages"].to(device), mask, ref_logps=None, beta=0.0,
            epsilon_low=self.options.clip_range, epsilon_high=self.options.clip_range,
            max_completion_length=self.options.max_new_tokens, **self.options.objective_options)
        value_loss, value_metrics = ppo_value_loss(values, batch["old_values"].to(device),
                                                   batch["returns"].to(device), mask, self.options.value_clip_range)
        metrics = {"policy_loss": float(policy_loss.detach()), "value_loss": float(value_loss.detach()),
                   **{key: float(value) for key, value in policy_metrics.items()}, **value_metrics}
        return policy_loss + self.options.vf_coef * value_loss, metrics, int(rollout.attention_mask.sum())


class PPOStage(Stage):
    """RLHF with PPO: value head, KL penalty to the starting model, GAE, clipped losses."""

    Options = PPOOptions
    headline_metric = "reward"
    objective_family = POLICY_GRADIENT

    def check(self) -> None:
        """The policy objective must be token-level: the value loss is a token mean, so the buffer weighs each
        completion by its tokens, and the update is normalised over every token of the accumulation window."""
        super().check()
        if not self.objective().token_level:
            raise PolmError(f"ppo's objective must be token-level (a mean over completion tokens, as its value "
                            f"loss is): '{self.options.objective}' is not; use dapo or a token_level plugin objective")

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Greedy ``exact_match`` on held-out rows with answers, and the mean ``reward`` of greedy completions."""
        metrics = super().evaluate(model, tokenizer)
        rows = self.eval_rows()
        if rows:
            metrics.update(RewardSource(self.options).held_out(model, tokenizer, rows, self.options.max_new_tokens))
        return metrics

    def run(self, context: StageContext) -> StageOutput:
        model, tokenizer, options = context.model, context.tokenizer, self.options
        value_head = ValueHead(hidden_size(model)).to(PartialState().device)
        step = PPOStep(options, tokenizer, RewardSource(options), ReferenceModel(model), value_head, self.objective())
        task = OnPolicyTask(
            rows=self.rows(),
            collect=step.collect,
            loss=step.loss,
            evaluate=lambda policy: self.evaluate(policy, tokenizer),
            extra_parameters=list(value_head.parameters()),
            save_state=value_head.save,
            load_state=value_head.load,
        )
        output = train(self.name, context, options, task)
        if not output.interrupted and PartialState().is_main_process:
            value_head.save(context.stage_dir)
        return output
