"""Learning tests of the reasoning paradigm, from the session's SFT checkpoint of polm-tiny (``sft_checkpoint``).

GRPO raises the reward of the prompts it trains on (on-policy, fresh samples every step), and, in the
slow tests, the held-out exact match of worked multi-step solutions (``examples/recipes/reasoning.yaml``);
self-consistency beats greedy decoding of the recipe's SFT checkpoint.
Not asserted, because they did not reach their targets at the budgets measured (figures in the reasoning
issue): a 5-point held-out gain of GRPO on single-operation polm:arithmetic (best +1.3 from 77.0%),
PRM best-of-n beating a random pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import polm
from polm.engine.data import load_rows
from polm.engine.recipe import load_recipe
from polm.modalities.text.tasks.arithmetic import arithmetic_rows
from polm.plugins.reasoning.scaling import scaled_exact_match

REASONING_RECIPE = Path(__file__).parents[1] / "examples" / "recipes" / "reasoning.yaml"


def test_grpo_raises_the_reward_of_its_training_prompts(sft_checkpoint, tmp_path):
    """16 hard questions (levels 3-4), 8 samples each per step; the rollouts' accuracy rises."""
    rows = [row for row in arithmetic_rows("train", 400) if row["level"] >= 3][:16]
    (polm.Pipeline(sft_checkpoint)
     .add("grpo", data=rows, batch_size=16, num_generations=8, max_steps=40, lr=3e-5, lr_scheduler="constant",
          rewards={"accuracy": 1.0, "format": 0.2}, reward_options={"format": {"pattern": r"-?\d+"}},
          max_new_tokens=8, log_every=10, eval_size=0)
     .run(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run/00-grpo/metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["reward/accuracy"], records[-1]["reward/accuracy"]
    assert records[-1]["reward/format"] >= 0.99, "the answers stay bare numbers"
    assert last >= first + 0.10, f"rollout accuracy over steps 1-10 {first:.1%}, over steps 31-40 {last:.1%}"


def test_reasoning_recipe_is_valid():
    """Every stage of the example recipe passes its option checks (the slow test below runs it)."""
    pipeline = load_recipe(REASONING_RECIPE).pipeline()
    assert [stage.name for stage in pipeline.stages] == ["sft", "sft", "grpo"]


@pytest.fixture(scope="module")
def think_run(sft_checkpoint, tmp_path_factory):
    """The reasoning recipe after its first stage (the quickstart's SFT): SFT on polm:arithmetic-think, then
    GRPO, evaluated before and after each stage."""
    recipe = load_recipe(REASONING_RECIPE)
    assert [stage["name"] for stage in recipe.stages] == ["sft", "sft", "grpo"]
    recipe.model, recipe.stages, recipe.stage_lines = str(sft_checkpoint), recipe.stages[1:], recipe.stage_lines[1:]
    return recipe.pipeline().run(tmp_path_factory.mktemp("reasoning") / "run", evaluate_before=True)


@pytest.mark.slow
def test_grpo_on_worked_solutions_raises_held_out_reward_and_exact_match_by_five_points(think_run):
    """GRPO with the accuracy and format rewards after SFT on worked solutions. Measured by script with the
    same settings: held-out exact_match 71.5% -> 77.5%, mean reward 0.915 -> 0.975."""
    grpo = think_run.stages[1]
    for metric in ("reward", "exact_match"):
        before, after = grpo.before[metric], grpo.metrics[f"eval/{metric}"]
        assert after >= before + 0.05, f"held-out {metric} {before:.3f} after SFT, {after:.3f} after GRPO"
    assert grpo.metrics["eval/reward/format"] >= 0.99, "the solutions keep the <think>/<answer> format"


@pytest.mark.slow
def test_self_consistency_beats_greedy_decoding_of_the_sft_checkpoint(think_run):
    """k=8 samples at temperature 0.3, majority vote on the extracted answer, against greedy decoding of the
    same SFT checkpoint on the 200 held-out questions, for each of three sampling seeds. Measured after 300
    steps of SFT on 50 000 worked solutions: greedy 71.5%, self-consistency 72.5 / 73.5 / 72.5%."""
    model, tokenizer = polm.load_model(think_run.stages[0].checkpoint)
    rows = load_rows("polm:arithmetic-think", "test")
    greedy = scaled_exact_match(model, tokenizer, rows, "greedy", max_new_tokens=64)["exact_match"]
    voted = []
    for seed in range(3):
        torch.manual_seed(seed)
        voted.append(scaled_exact_match(model, tokenizer, rows, "self_consistency", max_new_tokens=64, k=8,
                                        temperature=0.3)["exact_match"])
    assert min(voted) > greedy, f"greedy {greedy:.3f}, self-consistency {voted}"
