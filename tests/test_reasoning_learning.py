"""Learning tests of the reasoning paradigm, from the session's SFT checkpoint of polm-tiny (``sft_checkpoint``).

GRPO raises the reward of the prompts it trains on (on-policy, fresh samples every step), and, in the
slow tests, the held-out exact match of worked multi-step solutions (``examples/recipes/reasoning.yaml``);
self-consistency beats greedy decoding of the recipe's SFT checkpoint, and best-of-n with a PRM beats a
random pick of the same samples. The first two slow tests fail under pytest at present (figures in their
docstrings): they are the open targets of the reasoning issue, kept as they were set.
Not asserted, because it did not reach its target at the budgets measured (figures in the reasoning
issue): a 5-point held-out gain of GRPO on single-operation polm:arithmetic, with bare answers (best +1.3
from 77.0%) or with worked solutions, polm:arithmetic-worked (best +3.7, 69.7% -> 73.3% in 150 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import polm
from polm.engine.answers import answers_match
from polm.engine.data import load_rows
from polm.engine.evaluation import generate
from polm.engine.recipe import load_recipe
from polm.modalities.text.tasks.arithmetic import arithmetic_rows
from polm.plugins.reasoning.scaling import pick_best, scaled_exact_match

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
def think_sft(sft_checkpoint, tmp_path_factory):
    """The recipe's second stage from its first (the quickstart's SFT): SFT on polm:arithmetic-think."""
    recipe = load_recipe(REASONING_RECIPE)
    assert [stage["name"] for stage in recipe.stages] == ["sft", "sft", "grpo"]
    recipe.model, recipe.stages, recipe.stage_lines = str(sft_checkpoint), recipe.stages[1:2], recipe.stage_lines[1:2]
    return recipe.pipeline().run(tmp_path_factory.mktemp("reasoning") / "sft").stages[0].checkpoint


@pytest.mark.slow
def test_grpo_on_worked_solutions_raises_held_out_reward_and_exact_match_by_five_points(think_sft, tmp_path):
    """The recipe's GRPO stage (accuracy and format rewards) from its SFT on worked solutions. Measured by
    script with the same settings: held-out exact_match 71.5% -> 77.5%, mean reward 0.915 -> 0.975. Under
    pytest (a 74.0% start) this test FAILS, the reasoning issue's open target: 74.0% -> 77.5%, 0.939 -> 0.974."""
    recipe = load_recipe(REASONING_RECIPE)
    recipe.model, recipe.stages, recipe.stage_lines = str(think_sft), recipe.stages[2:], recipe.stage_lines[2:]
    grpo = recipe.pipeline().run(tmp_path / "grpo", evaluate_before=True).stages[0]
    for metric in ("reward", "exact_match"):
        before, after = grpo.before[metric], grpo.metrics[f"eval/{metric}"]
        assert after >= before + 0.05, f"held-out {metric} {before:.3f} after SFT, {after:.3f} after GRPO"
    assert grpo.metrics["eval/reward/format"] >= 0.99, "the solutions keep the <think>/<answer> format"


@pytest.mark.slow
def test_self_consistency_beats_greedy_decoding_of_the_sft_checkpoint(think_sft):
    """k=8 samples at temperature 0.3, majority vote on the extracted answer, against greedy decoding of the
    same SFT checkpoint on the 200 held-out questions, for each of three sampling seeds. Measured after 300
    steps of SFT on 50 000 worked solutions: greedy 71.5%, self-consistency 72.5 / 73.5 / 72.5%. Under pytest
    this test FAILS, the reasoning issue's open target: greedy 74.0%, self-consistency 73.5 / 73.0 / 75.5%."""
    model, tokenizer = polm.load_model(think_sft)
    rows = load_rows("polm:arithmetic-think", "test")
    greedy = scaled_exact_match(model, tokenizer, rows, "greedy", max_new_tokens=64)["exact_match"]
    voted = []
    for seed in range(3):
        torch.manual_seed(seed)
        voted.append(scaled_exact_match(model, tokenizer, rows, "self_consistency", max_new_tokens=64, k=8,
                                        temperature=0.3)["exact_match"])
    assert min(voted) > greedy, f"greedy {greedy:.3f}, self-consistency {voted}"


@pytest.mark.slow
def test_best_of_n_with_the_prm_beats_a_random_pick_of_the_same_samples(think_sft, tmp_path):
    """A likelihood PRM trained from the recipe's SFT checkpoint on polm:arithmetic-steps picks the best of
    8 samples (temperature 0.7) per held-out question; a random pick scores the samples' mean accuracy.
    Measured by script (the PRM on 30 000 step rows, otherwise these settings): 74.5% against 58.9%,
    greedy 71.5%; with the classifier head 47.0%. Passed under pytest in sessions 4 and 5."""
    policy = think_sft
    prm = (polm.Pipeline(str(policy))
           .add("prm", data="polm:arithmetic-steps", head="likelihood", max_steps=300, batch_size=32, lr=5e-5,
                warmup_ratio=0.05, eval_size=200)
           .run(tmp_path / "prm")).stages[0]
    model, tokenizer = polm.load_model(policy)
    rows = load_rows("polm:arithmetic-think", "test")
    torch.manual_seed(0)
    samples = generate(model, tokenizer, [row["prompt"] for row in rows], 64, temperature=0.7, num_samples=8)
    random_pick = sum(answers_match(sample, rows[index // 8]["answer"])
                      for index, sample in enumerate(samples)) / len(samples)
    best = pick_best(rows, samples, 8, "prm", {"checkpoint": str(prm.checkpoint)})
    best_of_8 = sum(answers_match(sample, row["answer"]) for sample, row in zip(best, rows)) / len(rows)
    assert best_of_8 >= random_pick + 0.05, f"best-of-8 by the PRM {best_of_8:.3f}, random pick {random_pick:.3f}"
