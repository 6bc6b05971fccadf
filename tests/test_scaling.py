"""Inference-time scaling: majority vote and best-of-n picks by hand, the methods end to end, and ``polm eval``."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import polm
from polm.engine.cli import main
from polm.engine.evaluation import exact_match, scaled_exact_match
from polm.engine.plugins import registry
from polm.plugins.reasoning.scaling import best_of_n, majority_vote, pick_best, self_consistency, self_refine


def test_majority_vote_by_hand():
    """Group 1: answers 3, 4, 3, 4 (tags stripped) tie 2-2, the first sampled (3) wins and its first
    completion is returned. Group 2: 7 wins 3-1; the first completion that said 7 is returned."""
    completions = ["<answer>3</answer>", "4", "3", "4", "8", "7.", "<answer>7</answer>", "7"]
    assert majority_vote(completions, 4) == ["<answer>3</answer>", "7."]


class LengthReward:
    @polm.hookimpl
    def polm_register_rewards(self, register):
        register("longest", lambda prompts, completions, bonus=0.0, **fields: [len(c) + bonus for c in completions])


def test_pick_best_takes_the_highest_reward_per_row_first_on_ties():
    manager = polm.plugin_manager()
    manager.register(LengthReward(), name="test-longest")
    try:
        rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
        picked = pick_best(rows, ["x", "xyz", "xy", "pq", "rs", "t"], 3, reward="longest",
                           reward_options={"bonus": 1.0})
    finally:
        manager.unregister(name="test-longest")
    assert picked == ["xyz", "pq"]


@pytest.mark.parametrize("method, settings", [
    ("self_consistency", {"k": 3}),
    ("best_of_n", {"n": 3, "reward": "format", "reward_options": {"pattern": r"\d+"}}),
    ("self_refine", {"rounds": 1, "critique_tokens": 4}),
])
def test_each_method_grades_one_completion_per_row(random_model, tokenizer, arithmetic, method, settings):
    """Every registered method hands back one completion per row, and the metrics cover exactly the rows' levels."""
    rows = arithmetic[1][:4]
    torch.manual_seed(0)
    completions = registry("inference_methods").get(method)(random_model, tokenizer, rows, max_new_tokens=4,
                                                            **settings)
    assert len(completions) == len(rows) and all(isinstance(c, str) for c in completions)
    metrics = scaled_exact_match(random_model, tokenizer, rows, method, max_new_tokens=4, **settings)
    levels = {f"exact_match/level_{row['level']}" for row in rows}
    assert set(metrics) == {"exact_match"} | levels
    assert 0.0 <= metrics["exact_match"] <= 1.0


def test_the_reasoning_plugin_registers_its_methods():
    methods = registry("inference_methods")
    assert {name: methods.get(name) for name in ("self_consistency", "best_of_n", "self_refine")} == \
        {"self_consistency": self_consistency, "best_of_n": best_of_n, "self_refine": self_refine}
    assert all(methods.entry(name).plugin == "polm.plugins.reasoning" for name in ("self_consistency", "best_of_n",
                                                                                  "self_refine"))


def test_self_consistency_of_one_greedy_sample_is_greedy_decoding(random_model, tokenizer, arithmetic):
    """k=1 at temperature 0 votes among one greedy sample: the same figures as greedy exact_match."""
    rows = arithmetic[1][:4]
    assert scaled_exact_match(random_model, tokenizer, rows, "self_consistency", max_new_tokens=4, k=1,
                              temperature=0.0) == exact_match(random_model, tokenizer, rows, max_new_tokens=4)


def test_unknown_method_names_the_choices(random_model, tokenizer, arithmetic):
    with pytest.raises(polm.PolmError, match="unknown inference method 'beam'. Available: best_of_n, self_consistency"):
        scaled_exact_match(random_model, tokenizer, arithmetic[1][:2], "beam")


def test_polm_eval_runs_self_consistency_and_best_of_n(capsys: Any):
    assert main(["eval", "polm-tiny", "--data", "polm:arithmetic", "--size", "3", "--max-new-tokens", "4",
                 "--method", "self_consistency", "--option", "k=2", "--option", "temperature=0.7"]) == 0
    assert "exact_match" in json.loads(capsys.readouterr().out)
    assert main(["eval", "polm-tiny", "--data", "polm:arithmetic", "--size", "3", "--max-new-tokens", "4",
                 "--method", "best_of_n", "--option", "n=2", "--option", "reward=format",
                 "--option", "reward_options.pattern=\\d+"]) == 0
    assert "exact_match" in json.loads(capsys.readouterr().out)
    assert main(["eval", "polm-tiny", "--data", "polm:arithmetic", "--method", "best_of_n",
                 "--option", "reward_options.checkpoint"]) == 2
    assert "--option expects KEY=VALUE, got 'reward_options.checkpoint'" in capsys.readouterr().err
