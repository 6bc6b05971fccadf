"""The ``grpo`` stage on a tiny random model: plugin rewards by name, variants, dynamic sampling, KL, resume."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import polm
from polm.engine.objectives import POLICY_GRADIENT, find_objective
from polm.plugins.reasoning.grpo import GRPOOptions
from polm.plugins.reasoning.grpo.stage import GRPOStep


def completion_chars(prompts: list[Any], completions: list[str], **fields: Any) -> list[float]:
    """A reward from a test plugin: the completion's length in characters."""
    return [float(len(completion)) for completion in completions]


def fixed_for_first_prompt(prompts: list[Any], completions: list[str], **fields: Any) -> list[float]:
    """1.0 for every completion of 'What is 1 + 1?' (an all-equal group), the length for the others."""
    return [1.0 if prompt == "What is 1 + 1?" else float(len(completion)) for prompt, completion in
            zip(prompts, completions)]


class RewardPlugin:
    """Registered on the plugin manager the way a user's plugin is."""

    @polm.hookimpl
    def polm_register_rewards(self, register):
        register("completion_chars", completion_chars, description="length in characters (test)")
        register("fixed_for_first_prompt", fixed_for_first_prompt, description="(test)")


@contextmanager
def reward_plugin() -> Iterator[None]:
    manager = polm.plugin_manager()
    manager.register(RewardPlugin(), name="test-reasoning-rewards")
    try:
        yield
    finally:
        manager.unregister(name="test-reasoning-rewards")


def grpo_pipeline(model, tokenizer, rows, **options) -> polm.Pipeline:
    settings = {"data": rows, "batch_size": 2, "num_generations": 4, "max_new_tokens": 6, "max_steps": 2,
                "log_every": 1, "eval_size": 0, "lr": 1e-3}
    return polm.Pipeline(model, tokenizer=tokenizer).add("grpo", **{**settings, **options})


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "00-grpo" / "metrics.jsonl").read_text().splitlines()]


def test_a_plugin_reward_is_usable_by_name_and_logged(random_model, tokenizer, arithmetic, tmp_path):
    with reward_plugin():
        grpo_pipeline(random_model, tokenizer, arithmetic[0],
                      rewards={"accuracy": 1.0, "completion_chars": 0.5}).run(tmp_path / "run")
    logged = records(tmp_path / "run")
    assert len(logged) == 2
    for record in logged:
        assert record["reward/completion_chars"] > 0
        assert record["reward"] == pytest.approx(record["reward/accuracy"] + 0.5 * record["reward/completion_chars"])
        for key in ("reward_std", "completion_length", "clip_fraction", "entropy", "sampling_tokens_per_s"):
            assert key in record, key


def test_unknown_rewards_and_stray_reward_options_fail_before_training(tmp_path):
    with pytest.raises(polm.PolmError, match=r"unknown reward 'acuracy'.*Did you mean 'accuracy'.*Available: .*format"):
        polm.Pipeline().add("grpo", data="polm:arithmetic", rewards={"acuracy": 1.0})
    with pytest.raises(polm.PolmError, match="'reward_options' sets options of format"):
        polm.Pipeline().add("grpo", data="polm:arithmetic", reward_options={"format": {"pattern": "x"}})
    with pytest.raises(polm.PolmError, match=r"unknown objective 'ppo'\. Did you mean 'grpo'\? Available: dapo, dr_grpo, grpo"):
        polm.Pipeline().add("grpo", data="polm:arithmetic", objective="ppo")
    with pytest.raises(polm.PolmError, match=r"unknown option 'loss_type'\. Did you mean 'objective'\?"):
        polm.Pipeline().add("grpo", data="polm:arithmetic", loss_type="dapo")  # TRL's name


def test_dynamic_sampling_drops_groups_with_equal_rewards(random_model, tokenizer):
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 3 * 4?", "answer": "12"}]
    options = GRPOOptions(data=rows, num_generations=4, max_new_tokens=6, objective="dapo",
                          rewards={"fixed_for_first_prompt": 1.0})
    torch.manual_seed(0)
    with reward_plugin():
        step = GRPOStep(options, tokenizer, {"fixed_for_first_prompt": 1.0}, None,
                        find_objective("dapo", POLICY_GRADIENT))
        buffer = step.collect(random_model, rows)
    rollout = buffer.fields["rollout"]
    assert buffer.metrics["groups_kept"] == 0.5
    assert len(rollout.texts) == 4 and buffer.fields["advantages"].shape == (4,)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 * 4?"}], tokenize=False,
                                             add_generation_prompt=True)
    kept_prompts = {tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask)}
    assert kept_prompts == {expected}


@pytest.mark.parametrize("options", [
    {"objective": "dr_grpo"},
    {"objective": "dapo"},
    {"advantage": "rloo", "num_iterations": 2},
    {"beta": 0.1},
])
def test_variants_train(random_model, tokenizer, arithmetic, tmp_path, options):
    before = [parameter.detach().clone() for parameter in random_model.parameters()]
    with reward_plugin():
        result = grpo_pipeline(random_model, tokenizer, arithmetic[0], rewards={"completion_chars": 1.0},
                               **options).run(tmp_path / "run")
    after = list(result.stages[0].checkpoint.glob("*.safetensors"))
    assert after, "the stage saved its model"
    assert any(not torch.equal(a, b) for a, b in zip(before, random_model.parameters())), "the policy moved"
    logged = records(tmp_path / "run")
    if options.get("beta"):
        assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6), "the first update starts at the reference"
        assert logged[1]["kl"] > 0
    if options.get("num_iterations") == 2:
        assert "reward" in logged[0] and "reward" not in logged[1], "the second step reuses the rollout"


def test_resume_at_a_generation_boundary_repeats_the_uninterrupted_run(random_model, tokenizer, arithmetic, tmp_path):
    """Stopped after step 2 of 4 (num_iterations 2), the resumed run logs the same losses and rewards
    and ends with the uninterrupted run's weights."""
    initial = {key: value.clone() for key, value in random_model.state_dict().items()}
    settings = {"rewards": {"completion_chars": 1.0}, "max_steps": 4, "num_iterations": 2}
    with reward_plugin():
        grpo_pipeline(random_model, tokenizer, arithmetic[0], **settings).run(tmp_path / "whole")
        expected = {key: value.clone() for key, value in random_model.state_dict().items()}
        random_model.load_state_dict(initial)
        pipeline = grpo_pipeline(random_model, tokenizer, arithmetic[0], **settings)
        stop = threading.Event()
        first = pipeline.run(tmp_path / "split", stop=stop,
                             on_log=lambda record: record["step"] == 2 and stop.set())
        assert first.stages[0].interrupted
        random_model.load_state_dict(initial)
        resumed = pipeline.run(tmp_path / "split", resume=True)
    assert not resumed.stages[0].interrupted
    for key, value in random_model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)

    def learning(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r.get("reward")) for r in records(tmp_path / run) if "loss" in r]

    assert learning("split") == learning("whole")
