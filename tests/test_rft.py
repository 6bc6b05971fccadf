"""Rejection-sampling fine-tuning: filtering by a reward, one update per generation batch, reward-call errors."""

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


def test_rft_samples_scores_and_trains_on_the_accepted_samples_each_step(random_model, tokenizer, arithmetic,
                                                                          tmp_path, rewards_plugin):
    """Each of two steps samples k completions of its batch's prompts, scores them all in one call, logs what
    was accepted and trains on it; the held-out evaluation runs at the end."""
    rows, test_rows = arithmetic
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "rft", data=rows, rewards={"has_digit": 1.0}, threshold=1.0, samples=3, max_new_tokens=4, max_steps=2,
        batch_size=4, log_every=1, eval_data=test_rows, eval_size=4,
    ).run(tmp_path / "run")
    assert rewards_plugin.calls == [12, 12]  # 4 prompts x 3 samples, per step
    logged = [json.loads(line) for line in (tmp_path / "run/00-rft/metrics.jsonl").read_text().splitlines()]
    steps = [record for record in logged if "accepted_fraction" in record]
    assert [record["step"] for record in steps] == [1, 2]
    for record in steps:
        assert 0 <= record["accepted_fraction"] <= 1 and 0 <= record["examples"] <= 12
        assert 0 <= record["prompts_solved"] <= 1
        assert ("label_tokens" in record) == (record["examples"] > 0), record  # trained on what it accepted
    assert "eval/exact_match" in result.stages[0].metrics


def _step(tokenizer, rows, **options):
    from polm.engine.lm import completion_loss
    from polm.plugins.finetuning.rft.stage import RFTOptions, RFTStep

    return RFTStep(RFTOptions(data=rows, **options), tokenizer, completion_loss)


def test_max_pass_rate_skips_prompts_whose_samples_all_passed(tokenizer, rewards_plugin):
    """Prompts of even level pass every sample (pass rate 1.0), the others none: at max_pass_rate 0.5
    nothing is learnt from; at 1.0 each even-level prompt contributes its distinct passing samples."""
    rows = [{"prompt": f"What is {n} + 1?", "answer": str(n + 1), "level": n % 4 + 1} for n in range(8)]
    completions = [f"{n + 1}" if sample < 2 else f"{n + 1}." for n in range(8) for sample in range(3)]
    for rate, expected in ((0.5, 0), (1.0, 8)):  # 4 even-level prompts x 2 distinct completions
        examples, stats = _step(tokenizer, rows, rewards={"even_level": 1.0}, samples=3,
                                max_pass_rate=rate).accepted(rows, completions)
        assert stats == {"accepted_fraction": 0.5, "mean_reward": 0.5, "prompts_solved": 0.5,
                         "examples": float(expected)}
        assert len(examples) == expected


def test_the_update_weighs_each_accepted_sample_by_its_label_tokens(random_model, tokenizer, rewards_plugin):
    """The buffer holds one update of every accepted sample, each weighing its label tokens: split into
    micro-batches, the loop's normalisation then gives the token mean over all of them."""
    from polm.engine.encoding import IGNORE_INDEX

    rows = [{"prompt": f"What is {n} + 1?", "answer": str(n + 1)} for n in range(4)]
    buffer = _step(tokenizer, rows, rewards={"has_digit": 1.0}, samples=2, max_new_tokens=4,
                   temperature=1.0).collect(random_model, rows)
    examples = buffer.fields["examples"]
    assert buffer.updates == [list(range(len(examples)))]
    assert buffer.weights.tolist() == [sum(label != IGNORE_INDEX for label in example.labels[1:])
                                       for example in examples]


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
