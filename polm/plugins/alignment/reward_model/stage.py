"""The ``reward_model`` stage: a Bradley–Terry reward model trained on preference pairs.

The stage builds a reward model from the model it is handed (see
:func:`~polm.plugins.alignment.reward_model.model.build_reward_model`), trains
it on ``{prompt, chosen, rejected}`` pairs and reports held-out pairwise
``accuracy``. Its ``final/`` folder holds the reward model in transformers
format (``AutoModelForSequenceClassification.from_pretrained`` loads it).

In a pipeline the reward model is a side product: the stage passes the model
it started from, unchanged, to the next stage (``trains_policy = False``). A
later stage uses the reward model as the reward ``reward_model`` with the
folder as its option, e.g. ``ppo: {rewards: {reward_model: 1.0},
reward_options: {reward_model: {path: runs/demo/01-reward_model}}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from polm.engine.data import encode_each, row_format
from polm.engine.encoding import keep_rows_that_fit
from polm.engine.option_groups import DataOptions
from polm.engine.options import StageOptions
from polm.engine.rl.reference import eval_mode
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.alignment.logps import EncodedPair, collate_pairs, encode_pair
from polm.plugins.alignment.reward_model.loss import bradley_terry_loss
from polm.plugins.alignment.reward_model.model import build_reward_model, is_reward_model


@dataclass
class RewardModelOptions(StageOptions, DataOptions):
    """Options of ``reward_model``; ``data`` holds preference rows ``{prompt, chosen, rejected}``."""

    margin: float = field(default=0.0, metadata={
        "help": "Bradley–Terry margin: the chosen score should exceed the rejected one by this much", "min": 0})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tuning != "full":
            raise ValueError(f"the reward model trains every weight; tuning '{self.tuning}' is not supported here, "
                             "remove the 'tuning' option")


class RewardModelStage(Stage):
    """Train a reward model on preference pairs; the next stage continues from the incoming policy."""

    Options = RewardModelOptions
    headline_metric = "accuracy"
    trains_policy = False

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy as it came: the reward model is built from it in :meth:`run` and the policy passes on."""
        return model

    def encode(self, tokenizer: Any, rows: list[dict[str, Any]], what: str) -> list[EncodedPair]:
        """The pairs of ``rows`` that fit ``max_length`` (:func:`keep_rows_that_fit`)."""
        max_length = self.options.max_length
        return keep_rows_that_fit(self.name, encode_each(rows, lambda row: encode_pair(tokenizer, row, max_length)),
                                  max_length, what)

    @torch.no_grad()
    def pair_scores(self, reward_model: torch.nn.Module, pairs: list[EncodedPair],
                    pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) scores of the chosen answers and (P,) of the rejected ones."""
        device = next(reward_model.parameters()).device
        chosen, rejected = [], []
        with eval_mode(reward_model):
            for start in range(0, len(pairs), self.options.batch_size):
                batch = collate_pairs(pairs[start: start + self.options.batch_size], pad_token_id)
                scores = reward_model(input_ids=batch["input_ids"].to(device),
                                      attention_mask=batch["attention_mask"].to(device)).logits[:, 0]  # (2b,)
                c, r = scores.float().cpu().chunk(2)
                chosen.append(c)
                rejected.append(r)
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Held-out pairwise ``accuracy`` (chosen scored strictly above rejected) and mean score ``margin``.

        Given the policy instead (before the stage, with ``evaluate_before``), a reward
        model with a fresh head (seed 0, the global RNG untouched) is built from it
        and evaluated: the untrained figure.
        """
        rows = [row for row in self.eval_rows() if row_format(row) == "preference"]
        if not rows:
            return {}
        if not is_reward_model(model):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = build_reward_model(model, tokenizer.pad_token_id)
        chosen, rejected = self.pair_scores(model, self.encode(tokenizer, rows, "eval_data"), tokenizer.pad_token_id)
        return {"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean())}

    def run(self, context: StageContext) -> StageOutput:
        tokenizer, options = context.tokenizer, self.options
        torch.manual_seed(context.seed)
        reward_model = build_reward_model(context.model, tokenizer.pad_token_id)
        pairs = self.encode(tokenizer, self.rows(), "data")

        def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            chosen, rejected = scores.float().chunk(2)  # (B,), (B,)
            return bradley_terry_loss(chosen, rejected, options.margin)

        task = TrainingTask(rows=pairs, collate=lambda items: collate_pairs(items, tokenizer.pad_token_id),
                            compute_loss=compute_loss, evaluate=lambda model: self.evaluate(model, tokenizer))
        return train(self.name, replace(context, model=reward_model), options, task)
