"""The ``rft`` stage: rejection-sampling fine-tuning (RFT / STaR), online.

The shared training loop drives it as an :class:`~polm.engine.trainer.OnPolicyTask`. For each generation
batch (``batch_size`` prompts per micro-batch, ``grad_accum`` micro-batches), :meth:`RFTStep.collect`
samples ``samples`` completions per prompt from the current model, keeps the distinct ones whose weighted
reward (``rewards``, as in every stage that scores completions) is at least ``threshold``, and the loop
makes one optimizer step of the language-modelling objective (``objective``, the completion cross-entropy
by default) on them, normalised over the label tokens of all of them (:mod:`polm.engine.rl.on_policy`).
References: Zelikman et al. 2022, "STaR: Bootstrapping Reasoning With Reasoning", arXiv:2203.14465; Yuan
et al. 2023, "Scaling Relationship on Learning Mathematical Reasoning with Large Language Models",
arXiv:2308.01825 (RFT); sampling afresh from the model being trained at every step is RAFT's online form
(Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment",
arXiv:2304.06767).

The defaults suit refining an already fine-tuned model: a small constant learning rate. Larger steps
over-fit the questions the model already solves (accepted samples lean towards the easy ones) and lower
held-out accuracy; ``max_pass_rate`` below 1 skips the prompts solved every time.

Logged each generation batch: ``accepted_fraction`` (samples at or above ``threshold``),
``mean_reward``, ``prompts_solved`` (prompts with an accepted sample) and ``examples`` (distinct accepted
samples trained on). Resume is the loop's: checkpoints hold an unfinished rollout buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from polm.engine.data import Row
from polm.engine.encoding import Encoded, encode_completion, pad_batch, truncate
from polm.engine.errors import PolmError
from polm.engine.evaluation import generate
from polm.engine.lm import label_tokens, lm_loss
from polm.engine.objectives import LANGUAGE_MODELLING, LanguageModellingObjective
from polm.engine.option_groups import DataOptions, RewardOptions, SamplingOptions
from polm.engine.options import StageOptions
from polm.engine.rewards import score_weighted
from polm.engine.rl.buffer import MicroBatch, RolloutBuffer
from polm.engine.rl.losses import zero_loss
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import OnPolicyTask, train


@dataclass
class RFTOptions(StageOptions, DataOptions, SamplingOptions, RewardOptions):
    """Options of ``rft``: ``data`` holds prompts with the fields the rewards need (e.g. ``{prompt, answer}``);
    ``batch_size`` counts prompts per micro-batch, and ``max_steps`` / ``epochs`` count generation batches
    (one optimizer step each)."""

    threshold: float = field(default=1.0, metadata={"help": "keep samples whose weighted reward is at least this"})
    samples: int = field(default=8, metadata={"help": "completions sampled per prompt", "min": 1})
    lr: float = field(default=3e-5, metadata={"help": "learning rate"})
    lr_scheduler: str = field(default="constant", metadata={"help": "learning-rate schedule"})
    max_pass_rate: float = field(default=1.0, metadata={
        "help": "learn from a prompt only when at most this fraction of its samples passed; below 1.0 it skips "
                "prompts the model already solves every time, which would otherwise dominate the data",
        "min": 0, "max": 1})
    objective: str = field(default="completion", metadata={
        "help": "a registered language_modelling objective to train on the accepted samples with"})
    objective_options: dict = field(default_factory=dict, metadata={"help": "the objective's keyword options"})


@dataclass
class RFTStep:
    """The ``collect`` and ``loss`` of ``rft``'s :class:`~polm.engine.trainer.OnPolicyTask`.

    Buffer fields (N accepted samples): ``examples``, the encoded prompt and completion of each, weighed by
    its label tokens, so that the one update is the objective's token mean over all of them.
    """

    options: RFTOptions
    tokenizer: Any
    objective: LanguageModellingObjective

    def accepted(self, rows: list[Row], completions: list[str]) -> tuple[list[Encoded], dict[str, float]]:
        """The distinct accepted samples of ``rows`` (``samples`` consecutive completions per row), encoded
        for training, and the batch's statistics."""
        options, k = self.options, self.options.samples
        repeated = [row for row in rows for _ in range(k)]
        rewards, _ = score_weighted(options.reward_weights(), repeated, completions, options.reward_options)
        passed = [value >= options.threshold for value in rewards]
        pass_rate = [sum(passed[start: start + k]) / k for start in range(0, len(passed), k)]  # per prompt
        kept, seen = [], set()
        for index, (row, completion) in enumerate(zip(repeated, completions)):
            key = (str(row["prompt"]), completion.strip())
            if passed[index] and pass_rate[index // k] <= options.max_pass_rate and key not in seen:
                seen.add(key)
                example = truncate(encode_completion(self.tokenizer, row["prompt"], completion.strip()),
                                   options.max_length)
                if example is not None:
                    kept.append(example)
        stats = {"accepted_fraction": sum(passed) / len(passed), "mean_reward": sum(rewards) / len(rewards),
                 "prompts_solved": sum(rate > 0 for rate in pass_rate) / len(rows), "examples": float(len(kept))}
        return kept, stats

    def collect(self, policy: torch.nn.Module, rows: list[Row]) -> RolloutBuffer:
        """Sample ``samples`` completions of each prompt of ``rows`` and keep the accepted ones for one update."""
        options = self.options
        completions = generate(extract_model_from_parallel(policy), self.tokenizer, [row["prompt"] for row in rows],
                               options.max_new_tokens, batch_size=options.batch_size * options.samples,
                               temperature=options.temperature, top_p=options.top_p,
                               num_samples=options.samples, stop_strings=options.stop_strings)
        examples, stats = self.accepted(rows, completions)
        pad_id = self.tokenizer.pad_token_id
        weights = torch.tensor([float(label_tokens(pad_batch([example], pad_id))) for example in examples])
        return RolloutBuffer({"examples": examples}, weights, [list(range(len(examples)))], stats)

    def loss(self, policy: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float], int]:
        """The objective's mean over the label tokens of ``batch``'s accepted samples."""
        if not batch.size:  # nothing accepted here: no gradient, but the other micro-batches still step
            return zero_loss(policy), {}, 0
        padded = pad_batch(batch["examples"], self.tokenizer.pad_token_id)
        device = next(policy.parameters()).device
        padded = {key: value.to(device) if torch.is_tensor(value) else value for key, value in padded.items()}
        loss, metrics = lm_loss(policy, padded, self.objective, self.options.objective_options)
        return loss, metrics, int(padded["attention_mask"].sum())


class RFTStage(Stage):
    """Sample, keep what the rewards accept, fine-tune on it; every step."""

    Options = RFTOptions
    objective_family = LANGUAGE_MODELLING

    def run(self, context: StageContext) -> StageOutput:
        rows = [row for row in self.rows() if "prompt" in row]
        if not rows:
            raise PolmError(f"stage '{self.name}': option 'data' has no rows with a 'prompt' to sample from")
        step = RFTStep(self.options, context.tokenizer, self.objective().fn)
        task = OnPolicyTask(rows=rows, collect=step.collect, loss=step.loss,
                            evaluate=lambda model: self.evaluate(model, context.tokenizer))
        return train(self.name, context, self.options, task)
