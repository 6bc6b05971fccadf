"""Learning tests of the reasoning paradigm, from the session's SFT checkpoint of polm-tiny (``sft_checkpoint``).

GRPO raises the reward of the prompts it trains on (on-policy, fresh samples every step), and, in the
slow tests, the held-out exact match and reward of solutions along several paths of polm:arithmetic's
questions (``examples/recipes/reasoning.yaml``); self-consistency beats greedy decoding of the recipe's
SFT stage trained to 900 steps, and best-of-n with a PRM beats a random pick of the same samples.
GRPO did not reach +5 on polm:arithmetic with bare answers (best +1.3 from 77.0%), with one place-value
solution per question, polm:arithmetic-worked (best +3.7, 69.7% -> 73.3%), nor on the multi-step
polm:arithmetic-think (74.0% -> 77.5%)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import polm
from polm.engine.answers import answers_match
from polm.engine.data import load_rows
from polm.engine.evaluation import exact_match, generate, scaled_exact_match
from polm.engine.recipe import load_recipe
from polm.modalities.text.tasks.arithmetic import arithmetic_rows
from polm.plugins.reasoning.scaling import pick_best

REASONING_RECIPE = Path(__file__).parents[1] / "examples" / "recipes" / "reasoning.yaml"


def test_grpo_raises_the_reward_of_its_training_prompts(sft_checkpoint, seed, tmp_path, record_property):
    """16 multiplications (level 4, where the quickstart model is weakest), 8 samples each per step; the
    rollouts' accuracy over steps 31-40 exceeds that over steps 1-10 by at least 10 points.

    Measured at one thread from the quickstart model of each seed, seeds 0 / 1 / 2: 41.2% -> 62.2%, 30.3% ->
    57.0%, 60.2% -> 77.0% on an Intel Xeon (by script); 54.5% -> 74.0%, 26.3% -> 51.7%, 60.6% -> 77.8% on an
    AMD EPYC (``python -m tests.seed_sweep``). The worst gain, +17.3 points, is 1.7 times the threshold. With levels 3 and 4 mixed, seed 2 started at 79.4% and
    rose only 9.5 points (to 88.8%): too little headroom left by the 3000-step quickstart.
    """
    rows = [row for row in arithmetic_rows("train", 400) if row["level"] == 4][:16]
    (polm.Pipeline(sft_checkpoint, seed=seed)
     .add("grpo", data=rows, batch_size=16, num_generations=8, max_steps=40, lr=3e-5, lr_scheduler="constant",
          rewards={"accuracy": 1.0, "format": 0.2}, reward_options={"format": {"pattern": r"-?\d+"}},
          max_new_tokens=8, log_every=10, eval_size=0)
     .run(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run/00-grpo/metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["reward/accuracy"], records[-1]["reward/accuracy"]
    record_property("accuracy_first", first)
    record_property("accuracy_last", last)
    assert records[-1]["reward/format"] >= 0.99, "the answers stay bare numbers"
    assert last >= first + 0.10, f"rollout accuracy over steps 1-10 {first:.1%}, over steps 31-40 {last:.1%}"


def test_reasoning_recipe_is_valid():
    """Every stage of the example recipe passes its option checks (the slow test below runs it)."""
    pipeline = load_recipe(REASONING_RECIPE).pipeline()
    assert [stage.name for stage in pipeline.stages] == ["sft", "sft", "grpo"]


def _recipe_paths_sft(sft_checkpoint: Path, seed: int, output_dir: Path, max_steps: int | None = None) -> Path:
    """The recipe's second stage (SFT on polm:arithmetic-paths) from its first, the quickstart's SFT, at the
    learning tests' ``seed``; ``max_steps`` replaces the recipe's 550."""
    recipe = load_recipe(REASONING_RECIPE)
    recipe.seed = seed
    assert [stage["name"] for stage in recipe.stages] == ["sft", "sft", "grpo"]
    recipe.model, recipe.stages, recipe.stage_lines = str(sft_checkpoint), recipe.stages[1:2], recipe.stage_lines[1:2]
    if max_steps is not None:
        recipe.stages[0]["max_steps"] = max_steps
    return recipe.pipeline().run(output_dir).stages[0].checkpoint


@pytest.fixture(scope="module")
def paths_sft(sft_checkpoint, seed, tmp_path_factory):
    """The recipe's stage 2 as written (550 steps: 60.0% held-out exact_match from the 3000-step quickstart,
    69% from the former 1200-step one): GRPO's start."""
    return _recipe_paths_sft(sft_checkpoint, seed, tmp_path_factory.mktemp("reasoning") / "sft")


@pytest.fixture(scope="module")
def long_paths_sft(sft_checkpoint, seed, tmp_path_factory):
    """The recipe's stage 2 trained 900 steps (84.7-86.7% from the 3000-step quickstart; 92% from the former
    1200-step one). Stage 2 stops at 550 to leave GRPO room; at 550
    steps a temperature-0.3 sample is right less often than the greedy solution (65% against 69%), so a
    vote of them does not beat greedy, while at 900 steps the samples are nearly as good (91% against 92%)
    and slip on different questions, which is what self-consistency needs."""
    return _recipe_paths_sft(sft_checkpoint, seed, tmp_path_factory.mktemp("reasoning") / "long-sft", max_steps=900)


@pytest.fixture(scope="module")
def think_sft(sft_checkpoint, seed, tmp_path_factory):
    """SFT from the quickstart's checkpoint on polm:arithmetic-think, the multi-step questions whose steps
    polm:arithmetic-steps labels (the PRM's training data)."""
    return (polm.Pipeline(str(sft_checkpoint), seed=seed)
            .add("sft", data="polm:arithmetic-think", max_steps=300, batch_size=32, lr=1e-3, warmup_ratio=0.05,
                 eval_size=200, max_new_tokens=64)
            .run(tmp_path_factory.mktemp("reasoning") / "think")).stages[0].checkpoint


@pytest.mark.slow
def test_grpo_raises_held_out_reward_and_exact_match_on_polm_arithmetic_by_five_points(paths_sft, seed, tmp_path,
                                                                                        record_property):
    """The recipe's GRPO stage (accuracy and format rewards) from its SFT on polm:arithmetic-paths, scored
    greedily on polm:arithmetic's 300 held-out questions. Measured under pytest from the former 1200-step
    quickstart: exact_match 69.3% -> 75.7%, mean reward 0.893 -> 0.957; from 650 SFT steps (82.0%) it ended at
    80.3%. From the 3000-step quickstart this test FAILS (issue 16, seed 0, one thread): stage 2 reaches 60.0%
    and GRPO leaves it at 60.0% (reward 0.799 -> 0.800); from 900 SFT steps 84.7% -> 87.0%; at lr 1e-4 45.3%.
    On polm:arithmetic-think (SFT 300 steps, 77.5%) the same GRPO changed no greedy answer (77.5%), and at
    lr 1e-4 with beta 0.04 it raised the sampled accuracy 41% -> 49% while greedy fell to 70.0%."""
    recipe = load_recipe(REASONING_RECIPE)
    recipe.model, recipe.stages, recipe.stage_lines = str(paths_sft), recipe.stages[2:], recipe.stage_lines[2:]
    recipe.seed = seed
    grpo = recipe.pipeline().run(tmp_path / "grpo", evaluate_before=True).stages[0]
    print({key: (round(value, 4), round(grpo.metrics[f"eval/{key}"], 4)) for key, value in grpo.before.items()})
    for metric in ("reward", "exact_match"):
        before, after = grpo.before[metric], grpo.metrics[f"eval/{metric}"]
        record_property(f"{metric}_before", before)
        record_property(f"{metric}_after", after)
        assert after >= before + 0.05, f"held-out {metric} {before:.3f} after SFT, {after:.3f} after GRPO"
    assert grpo.metrics["eval/reward/format"] >= 0.99, "the solutions keep the <think>/<answer> format"


@pytest.mark.slow
def test_self_consistency_beats_greedy_decoding_of_the_same_checkpoint(long_paths_sft, record_property):
    """The majority answer of k=32 samples at temperature 0.5 against greedy decoding of the same checkpoint
    (``long_paths_sft``) on polm:arithmetic's 300 held-out questions. The answers' probability is spread over
    several solution paths, which greedy decoding cannot add up; the vote does, and its gain grows with k.

    Measured at one thread from the 3000-step quickstart, by script (the test's calls; the same samples cut
    into votes of each size), greedy -> vote of 32: 84.7% -> 87.3%, 85.0% -> 88.0%, 86.7% -> 90.3% at seeds
    0 / 1 / 2 (worst gain +2.7 points, 8 questions). Seed 0's votes of 8: 84.7 / 85.7 / 85.7 / 85.3%, of 16:
    86.7 / 86.0%; at temperature 0.8 the vote of 32 gave 87.7%. With k=8 at temperature 0.3, as this test
    was before, the vote was 85.3 / 86.7 / 84.3% over three sampling seeds: one below greedy, the effect
    smaller than its spread. On the recipe's 550-step checkpoint no temperature beat greedy; on polm:arithmetic-think votes of
    8 and 16 fell below greedy (77.5% against 75.5-79.0% at seed 0, 71.0% against 64.0-66.0% at seed 1).
    """
    model, tokenizer = polm.load_model(long_paths_sft)
    rows = load_rows("polm:arithmetic-paths", "test")
    greedy = exact_match(model, tokenizer, rows, max_new_tokens=64)["exact_match"]
    torch.manual_seed(0)
    voted = scaled_exact_match(model, tokenizer, rows, "self_consistency", max_new_tokens=64, k=32,
                               temperature=0.5)["exact_match"]
    print(f"greedy {greedy:.4f}, self-consistency of 32 {voted:.4f}")
    record_property("greedy", greedy)
    record_property("voted", voted)
    assert voted > greedy, f"greedy {greedy:.3f}, self-consistency of 32 samples {voted:.3f}"


@pytest.mark.slow
def test_best_of_n_with_the_prm_beats_a_random_pick_of_the_same_samples(think_sft, seed, tmp_path, record_property):
    """A likelihood PRM trained from ``think_sft`` on polm:arithmetic-steps picks the best of
    8 samples (temperature 0.7) per held-out question; a random pick scores the samples' mean accuracy.
    Measured by script (the PRM on 30 000 step rows, otherwise these settings): 74.5% against 58.9%,
    greedy 71.5%; with the classifier head 47.0%. Under pytest: 76.5% against 60.8%."""
    policy = think_sft
    prm = (polm.Pipeline(str(policy), seed=seed)
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
    print(f"best-of-8 by the PRM {best_of_8:.4f}, random pick {random_pick:.4f}")
    record_property("best_of_8", best_of_8)
    record_property("random_pick", random_pick)
    assert best_of_8 >= random_pick + 0.05, f"best-of-8 by the PRM {best_of_8:.3f}, random pick {random_pick:.3f}"
