"""The online_dpo stage: two samples per prompt, the reward picks the chosen one, ties are skipped.

Runs use the random two-layer Llama of ``random_model`` and throwaway rewards registered by a test plugin.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import polm
from polm.plugins.alignment.online_dpo import OnlineDPOStage

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]


class _Rewards:
    """``test_length`` (characters / 10) decides most pairs; ``test_constant`` ties every pair."""

    @polm.hookimpl
    def polm_register_rewards(self, register):
        register("test_length", lambda prompts, completions, **fields: [len(c) / 10 for c in completions])
        register("test_constant", lambda prompts, completions, **fields: [1.0] * len(completions))


@pytest.fixture(autouse=True)
def rewards():
    polm.plugin_manager().register(_Rewards(), name="test-online-rewards")
    try:
        yield
    finally:
        polm.plugin_manager().unregister(name="test-online-rewards")


def records(run_dir):
    lines = (run_dir / "00-online_dpo/metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_online_dpo_trains_on_sampled_pairs_with_any_pairwise_objective(random_model, tokenizer, tmp_path,
                                                                        objective):
    """Step 1 of dpo is ln 2 (the policy is its own reference); the sampling and objective metrics are logged."""
    polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "online_dpo", data=PROMPTS, rewards={"test_length": 1.0}, objective=objective, max_steps=3, batch_size=4,
        max_new_tokens=6, lr=1e-2, log_every=1, eval_size=0).run(tmp_path / "run")
    logged = records(tmp_path / "run")
    assert {"loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "score",
            "pair_fraction", "chosen_score", "rejected_score"} <= logged[0].keys()
    assert logged[0]["pair_fraction"] > 0 and logged[0]["chosen_score"] > logged[0]["rejected_score"]
    if objective == "dpo":
        assert logged[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert OnlineDPOStage.headline_metric == "reward"


def test_tied_pairs_are_skipped_and_change_nothing(random_model, tokenizer, tmp_path):
    """A constant reward ties every pair: no pair is trained on, the loss is 0 and the weights stay."""
    start = copy.deepcopy(random_model)
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "online_dpo", data=PROMPTS, rewards="test_constant", max_steps=2, batch_size=4, max_new_tokens=4,
        lr=1e-2, log_every=1, eval_size=0, weight_decay=0.0).run(tmp_path / "run")
    logged = records(tmp_path / "run")
    assert [record["pair_fraction"] for record in logged] == [0.0, 0.0]
    assert [record["loss"] for record in logged] == [0.0, 0.0]
    trained = result.stages[0]
    assert trained.checkpoint is not None
    for before, after in zip(start.parameters(), polm.load_model(trained.checkpoint)[0].parameters()):
        assert torch.equal(before, after)


def test_online_dpo_takes_a_judge_as_its_reward(random_model, tokenizer, tmp_path):
    """rewards: {judge: 1} with the judge a checkpoint folder (here the random model itself)."""
    copy.deepcopy(random_model).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "online_dpo", data=PROMPTS, rewards={"judge": 1.0}, reward_options={"judge": {"model": str(tmp_path / "judge")}},
        max_steps=1, batch_size=4, max_new_tokens=4, log_every=1, eval_size=0).run(tmp_path / "run")
    score = records(tmp_path / "run")[0]["score"]
    assert 0.0 <= score <= 1.0


class _RecordingObjective:
    """A runtime plugin contributing the pairwise objective ``recorded_dpo`` (dpo that records its batch sizes)."""

    def __init__(self):
        self.calls: list[int] = []

    @polm.hookimpl
    def polm_register_objectives(self, register):
        from polm.plugins.alignment.objectives import dpo_loss

        def recorded_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
            self.calls.append(policy_chosen.shape[0])
            return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)

        register("recorded_dpo", recorded_dpo, family="pairwise")


def test_a_plugin_objective_is_selected_by_name_and_runs(random_model, tokenizer, tmp_path):
    """objective: recorded_dpo runs the plugin's function: once on (1,) zeros when the stage is added, then
    once per step on the step's untied pairs."""
    plugin = _RecordingObjective()
    polm.plugin_manager().register(plugin, name="test-recorded-dpo")
    try:
        pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add(
            "online_dpo", data=PROMPTS, rewards="test_length", objective="recorded_dpo", max_steps=2, batch_size=4,
            max_new_tokens=6, log_every=1, eval_size=0)
        assert plugin.calls == [1]
        pipeline.run(tmp_path / "run")
    finally:
        polm.plugin_manager().unregister(name="test-recorded-dpo")
    pairs = [round(record["pair_fraction"] * 4) for record in records(tmp_path / "run")]
    assert plugin.calls[1:] == [count for count in pairs if count], (plugin.calls, pairs)


def test_online_dpo_needs_a_reward():
    """``rewards`` defaults to {accuracy: 1.0}, as in every stage that scores completions; naming none fails."""
    with pytest.raises(polm.PolmError, match="option 'rewards' names no reward"):
        polm.Pipeline("polm-tiny").add("online_dpo", data="polm:arithmetic", rewards={})
