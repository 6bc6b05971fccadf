"""Rejection-sampling fine-tuning: filtering by a reward, rounds, and reward-call errors."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

import polm
from polm.engine.rewards import score


class _Rewards:
    """A runtime plugin with rewards: one accepts completions that contain a digit, one the samples of
    even-numbered prompts only, one is broken."""

    calls: ClassVar[list[int]] = []

    @polm.hookimpl
    def polm_register_rewards(self, register):
        def has_digit(prompts, completions, **fields):
            self.calls.append(len(completions))
            return [float(any(ch.isdigit() for ch in c)) for c in completions]

        register("has_digit", has_digit)
        register("too_short", lambda prompts, completions, **fields: [1.0])
        register("even_level", lambda prompts, completions, level, **fields: [float(lv % 2 == 0) for lv in level])


@pytest.fixture
def rewards_plugin():
    plugin = _Rewards()
    polm.plugin_manager().register(plugin, name="test-rft-rewards")
    try:
        yield plugin
    finally:
        polm.plugin_manager().unregister(name="test-rft-rewards")


def test_rft_keeps_accepted_samples_and_trains_each_round(random_model, tokenizer, arithmetic, tmp_path,
                                                          rewards_plugin):
    """Two rounds sample k completions per prompt, score them all, and fine-tune on the accepted ones."""
    rows, test_rows = arithmetic
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "rft", data=rows, rewards={"has_digit": 1.0}, threshold=1.0, rounds=2, samples=3, prompts_per_round=8,
        max_new_tokens=4, max_steps=2, batch_size=4, eval_data=test_rows, eval_size=4,
    ).run(tmp_path / "run")
    assert rewards_plugin.calls == [24, 24]  # 8 prompts x 3 samples, per round
    accepted = [json.loads((tmp_path / f"run/00-rft/round-{index}/final/round.json").read_text())
                [f"round_{index}/accepted_fraction"] for index in range(2)]
    assert all(0 <= fraction <= 1 for fraction in accepted) and accepted[0] > 0, accepted
    assert "eval/exact_match" in result.stages[0].metrics


def test_max_pass_rate_skips_prompts_whose_samples_all_passed(random_model, tokenizer, rewards_plugin):
    """Prompts of even level pass every sample (pass rate 1.0), the others none: at max_pass_rate 0.5
    nothing is learnt from; at 1.0 each even-level prompt contributes its distinct passing samples."""
    from polm.plugins.finetuning.rft.stage import RFTStage

    rows = [{"prompt": f"What is {n} + 1?", "answer": str(n + 1), "level": n % 4 + 1} for n in range(8)]
    stats = {}
    for rate in (0.5, 1.0):
        stage = RFTStage("rft", RFTStage.Options(data=rows, rewards={"even_level": 1.0}, samples=3, prompts_per_round=8,
                                                 max_new_tokens=3, max_pass_rate=rate))
        examples, stats[rate] = stage.sample_round(random_model, tokenizer, rows, seed=0)
        assert stats[rate]["accepted_fraction"] == 0.5 and stats[rate]["prompts_solved"] == 0.5
        assert len(examples) == stats[rate]["examples"]
    assert stats[0.5]["examples"] == 0
    assert 4 <= stats[1.0]["examples"] <= 12  # 4 prompts x 3 samples, minus repeated completions


def test_reward_with_wrong_length_is_named_with_the_sample(rewards_plugin):
    """A reward that returns the wrong number of values fails with its name and the first sample."""
    reward = polm.components("rewards")["too_short"]
    with pytest.raises(polm.PolmError, match=r"reward 'too_short' returned 1 values for 2 completions.*What is"):
        score("too_short", reward, [{"prompt": "What is 1 + 1?", "answer": "2"}] * 2, ["2", "3"])


def test_accuracy_reward_reads_answer_fields():
    """The built-in accuracy reward compares extracted answers with the rows' 'answer' field."""
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 9 - 4?", "answer": "5"},
            {"prompt": "q", "answer": "12"}]
    values = score("accuracy", polm.components("rewards")["accuracy"], rows, ["5", "6", "<answer>12</answer>"])
    assert values == [1.0, 0.0, 1.0]
