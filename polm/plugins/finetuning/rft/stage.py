"""The ``rft`` stage: rejection-sampling fine-tuning (RFT / STaR).

Each round samples ``samples`` completions per prompt from the current model,
keeps those whose weighted reward (``rewards``, as in every stage that scores
completions) is at least ``threshold``, and fine-tunes on them with the SFT loss. References: Zelikman et al. 2022,
"STaR: Bootstrapping Reasoning With Reasoning"; Yuan et al. 2023, "Scaling
Relationship on Learning Mathematical Reasoning with Large Language Models" (RFT).

The defaults suit refining an already fine-tuned model: a small constant
learning rate and one pass over each round's accepted samples. Larger steps,
or many passes over few samples, over-fit the questions the model already
solves (accepted samples lean towards the easy ones) and lower held-out
accuracy; on polm-tiny after the quickstart these defaults raised held-out
``exact_match`` from 77.0% to 79.3% in three rounds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from polm.engine.checkpoint import atomic_directory, save_model
from polm.engine.data import load_rows
from polm.engine.encoding import encode_completion, pad_batch, truncate
from polm.engine.evaluation import generate
from polm.engine.lm import lm_loss
from polm.engine.option_groups import DataOptions, RewardOptions, SamplingOptions
from polm.engine.options import StageOptions
from polm.engine.rewards import score_weighted
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.engine.tuning import tuning_method

ROUND_FILE = "round.json"


@dataclass
class RFTOptions(StageOptions, DataOptions, SamplingOptions, RewardOptions):
    """Options of ``rft``: ``data`` holds prompts with the fields the rewards need (e.g. ``{prompt, answer}``);
    ``max_steps`` / ``epochs`` apply to each round's fine-tuning."""

    threshold: float = field(default=1.0, metadata={"help": "keep samples whose weighted reward is at least this"})
    rounds: int = field(default=3, metadata={"help": "sample-filter-train rounds", "min": 1})
    samples: int = field(default=8, metadata={"help": "completions sampled per prompt each round", "min": 1})
    prompts_per_round: int = field(default=2048, metadata={
        "help": "prompts drawn (seeded) from data each round", "min": 1})
    lr: float = field(default=3e-5, metadata={"help": "learning rate of each round's fine-tuning"})
    lr_scheduler: str = field(default="constant", metadata={"help": "schedule within each round"})
    max_pass_rate: float = field(default=1.0, metadata={
        "help": "learn from a prompt only when at most this fraction of its samples passed; below 1.0 it skips "
                "prompts the model already solves every time, which would otherwise dominate the data",
        "min": 0, "max": 1})


class RFTStage(Stage):
    """Sample, keep what the rewards accept, fine-tune; repeat."""

    Options = RFTOptions

    def sample_round(self, model: torch.nn.Module, tokenizer: Any, rows: list[dict], seed: int) -> tuple[list, dict]:
        """Sampled completions the rewards accept, as SFT examples, and the round's statistics."""
        options = self.options
        prompts = random.Random(seed).sample(rows, min(options.prompts_per_round, len(rows)))
        repeated = [row for row in prompts for _ in range(options.samples)]
        torch.manual_seed(seed)
        completions = generate(model, tokenizer, [row["prompt"] for row in repeated], options.max_new_tokens,
                               temperature=options.temperature, top_p=options.top_p, stop_strings=options.stop_strings)
        rewards, _ = score_weighted(options.reward_weights(), repeated, completions, options.reward_options)
        passed = [value >= options.threshold for value in rewards]
        k = options.samples
        pass_rate = [sum(passed[start: start + k]) / k for start in range(0, len(passed), k)]  # per prompt
        kept, seen = [], set()
        for index, (row, completion) in enumerate(zip(repeated, completions)):
            key = (str(row["prompt"]), completion.strip())
            if passed[index] and pass_rate[index // k] <= options.max_pass_rate and key not in seen:
                seen.add(key)
                example = truncate(encode_completion(tokenizer, row["prompt"], completion.strip()), options.max_length)
                if example is not None:
                    kept.append(example)
        solved = {str(row["prompt"]) for row, ok in zip(repeated, passed) if ok}
        stats = {"accepted_fraction": sum(passed) / len(passed),
                 "mean_reward": sum(rewards) / len(rewards),
                 "prompts_solved": len(solved) / len({str(row["prompt"]) for row in prompts}), "examples": len(kept)}
        return kept, stats

    def run(self, context: StageContext) -> StageOutput:
        rows = load_rows(self.options.data, "train")
        model, tokenizer = context.model, context.tokenizer
        metrics: dict[str, float] = {}
        for index in range(self.options.rounds):
            round_dir = context.stage_dir / f"round-{index}"
            done = round_dir / "final"
            if context.resume and (done / ROUND_FILE).is_file():
                tuning_method(self.options).load_weights(model, done)
                metrics = json.loads((done / ROUND_FILE).read_text())
                continue
            round_dir.mkdir(parents=True, exist_ok=True)
            examples, stats = self.sample_round(model, tokenizer, rows, context.seed * 1000 + index)
            round_metrics = {f"round_{index}/{k}": v for k, v in stats.items()}
            if not examples:  # nothing accepted: keep the model, the next round samples again
                metrics = round_metrics
                self._finish_round(done, model, tokenizer, metrics)
                continue
            task = TrainingTask(
                rows=examples,
                collate=lambda items: pad_batch(items, tokenizer.pad_token_id),
                compute_loss=lm_loss,
                evaluate=lambda m: self.evaluate(m, tokenizer),
            )
            output = train(self.name, replace(context, model=model, stage_dir=round_dir), self.options, task)
            model = output.model
            if output.interrupted:
                return StageOutput(model, output.metrics, interrupted=True)
            metrics = {**output.metrics, **round_metrics}
            self._finish_round(done, model, tokenizer, metrics)
        if not any(key.startswith("eval/") for key in metrics):  # the last round trained nothing
            metrics.update({f"eval/{key}": value for key, value in self.evaluate(model, tokenizer).items()})
        return StageOutput(model, metrics)

    @staticmethod
    def _finish_round(done: Any, model: torch.nn.Module, tokenizer: Any, metrics: dict[str, float]) -> None:
        """Save the round's model and metrics so that a resumed run skips the round."""
        with atomic_directory(done) as directory:
            save_model(model, tokenizer, directory)
            (directory / ROUND_FILE).write_text(json.dumps(metrics))
