"""Learning tests of RLHF from the quickstart's SFT model (``sft_checkpoint``): a reward model, then PPO driven by it.

Both are marked ``slow`` (run them with ``pytest -m slow``): the reward model needs about three epochs of
polm:arithmetic-prefs (2000 steps of 32 pairs, 15-20 minutes on one CPU thread) to rank 80% of the held-out
pairs: it learns to check an answer from the last token alone, which the SFT model never had to do. Shorter
runs measured: 0.70 after 300 steps of 32 pairs, 0.76 after 2400 steps of 8 pairs, 0.71 after 400 steps at
lr 3e-4 with warm-up.

PPO's gain is asserted on its 16 training prompts only. Measured on the 300 held-out questions, greedy
exact_match fell 0.77 -> 0.70 and the reward model's mean score of the greedy answers 0.50 -> 0.39: the
policy finds wrong answers the reward model prefers (it ranks 71% of the held-out level-3 pairs and 61% of
the multiplications).
"""

from __future__ import annotations

import json
import math

import pytest

import polm
from polm.modalities.text.tasks.arithmetic import arithmetic_rows

pytestmark = pytest.mark.slow

HELD_OUT = 300  # the whole polm:arithmetic-prefs test pool

#: Measured: held-out pairwise accuracy 0.52 before; 0.737, 0.797, 0.807, 0.823 after 500, 1000, 1500, 2000 steps.
REWARD_MODEL_RECIPE = {"data": "polm:arithmetic-prefs", "max_steps": 2000, "batch_size": 32, "lr": 1e-4,
                       "eval_size": HELD_OUT, "log_every": 50}

#: 16 fixed questions of every level, 8 samples each per rollout, 4 updates per rollout, 20 rollouts. The
#: prompts repeat so that the rollouts' mean score compares like with like (fresh prompts each rollout make
#: it swing by more than PPO moves it); the prompt baseline removes each question's score offset.
#: Measured from the former 1200-step quickstart: mean score 0.30 over the first 20% of rollouts, 0.82 over
#: the last 20%, KL 0.70 per completion at the end (kl_coef 0.1: 0.31 -> 0.86, KL 0.98, and the sampled
#: accuracy falls). From the 3000-step quickstart, one thread: 3.095 -> 3.447 at seed 0 (KL 0.51), but
#: 4.202 -> 4.336 at seed 1 (KL 0.10), where the scores' spread within a rollout is 2.2: this test FAILS at
#: seed 1, and no recipe tried there rose by more than 0.19 (lr 1e-4, 40 rollouts, levels 3-4 only, or
#: both). It needs a redesign (issue 16), not a lower RISE.
PPO_RECIPE = {"data": arithmetic_rows("train", 16), "batch_size": 16, "samples": 8, "ppo_epochs": 2,
              "minibatches": 2, "prompt_baseline": True, "kl_coef": 0.3, "max_steps": 80, "lr": 3e-5,
              "lr_scheduler": "constant", "max_new_tokens": 8, "log_every": 1, "eval_size": 0}
RISE = 0.25  # asserted rise of the mean score, half the measured one


@pytest.fixture(scope="module")
def reward_model_run(sft_checkpoint, seed, tmp_path_factory):
    """The reward_model stage trained on polm:arithmetic-prefs from the SFT model: (its result, its folder)."""
    root = tmp_path_factory.mktemp("rlhf")
    result = polm.Pipeline(str(sft_checkpoint), seed=seed).add("reward_model", **REWARD_MODEL_RECIPE).run(
        root / "run", evaluate_before=True)
    return result, root / "run" / "00-reward_model"


def test_reward_model_ranks_held_out_pairs(reward_model_run, record_property):
    """At least 80% of the 300 held-out pairs have the correct answer scored above the wrong one."""
    result, _ = reward_model_run
    stage = result.stages[0]
    figures = f"held-out pairwise accuracy {stage.before['accuracy']:.3f} -> {stage.metrics['eval/accuracy']:.3f}"
    record_property("accuracy_before", stage.before["accuracy"])
    record_property("accuracy_after", stage.metrics["eval/accuracy"])
    assert stage.metrics["eval/accuracy"] >= 0.8, figures


def test_ppo_raises_the_reward_model_score(sft_checkpoint, reward_model_run, seed, tmp_path, record_property):
    """PPO driven by that reward model: the rollouts' mean score over the last 20% of updates exceeds the
    first 20%'s; the KL to the starting model is logged with every update and stays finite."""
    _, reward_model = reward_model_run
    polm.Pipeline(str(sft_checkpoint), seed=seed).add(
        "ppo", rewards={"reward_model": 1.0}, reward_options={"reward_model": {"path": str(reward_model)}},
        **PPO_RECIPE).run(tmp_path / "run")
    records = [r for r in map(json.loads, (tmp_path / "run/00-ppo/metrics.jsonl").read_text().splitlines())
               if "score" in r]  # one per rollout: the steps that sampled it
    fifth = len(records) // 5
    first = sum(r["score"] for r in records[:fifth]) / fifth
    last = sum(r["score"] for r in records[-fifth:]) / fifth
    kl = [r["kl"] for r in records]
    record_property("score_first", first)
    record_property("score_last", last)
    record_property("kl_end", kl[-1])
    figures = f"mean score over the first 20% of updates {first:.3f}, last 20% {last:.3f}; KL at the end {kl[-1]:.3f}"
    assert all(math.isfinite(value) for value in kl), figures
    assert last >= first + RISE, figures

