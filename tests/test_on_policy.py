"""The training loop's on-policy driving: the rollout buffer, the loss normalisation over the accumulation
window, and exact resume after a SIGKILL between two updates of one generation batch.

Plumbing runs use the random two-layer Llama of ``random_model`` and the built-in ``length`` reward, so that
completions differ in reward.
"""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.engine.objectives import POLICY_GRADIENT, find_objective
from polm.engine.rl import ReferenceModel
from polm.engine.rl.buffer import RolloutBuffer
from polm.engine.rl.on_policy import OnPolicySteps
from polm.engine.trainer import make_accelerator
from polm.plugins.alignment.ppo import PPOOptions, ValueHead
from polm.plugins.alignment.ppo.stage import PPOStep
from polm.plugins.reasoning.grpo import GRPOOptions
from polm.plugins.reasoning.grpo.stage import GRPOStep
from tests.helpers import final_tensors, run_in_child


def test_an_update_is_cut_into_micro_batches_that_carry_their_weight():
    """Five samples, one update, two micro-batches: samples (0, 1) and (2, 3, 4), weights 1 + 2 and 3 + 4 + 5."""
    buffer = RolloutBuffer({"advantages": torch.arange(5.0), "texts": list("abcde")},
                           torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), [[0, 1, 2, 3, 4]])
    first, second = buffer.next_update(2)
    assert buffer.exhausted
    assert (first.size, first.weight, first["texts"]) == (2, 3.0, ["a", "b"])
    assert (second.size, second.weight, second["texts"]) == (3, 12.0, ["c", "d", "e"])
    assert_close(second["advantages"], torch.tensor([2.0, 3.0, 4.0]))


def test_a_buffer_state_rebuilds_the_buffer_where_it_was():
    buffer = RolloutBuffer({"advantages": torch.ones(2)}, torch.ones(2), [[0, 1], [1, 0]], {"reward": 0.5})
    buffer.next_update(1)
    restored = RolloutBuffer.from_state(buffer.state())
    assert (restored.done, restored.updates, restored.metrics) == (1, [[0, 1], [1, 0]], {"reward": 0.5})
    assert [micro.fields["advantages"].tolist() for micro in restored.next_update(1)] == [[1.0, 1.0]]


def _gradients(steps: OnPolicySteps, model: torch.nn.Module, parameters: list[torch.nn.Parameter],
               rows: list[dict]) -> list[torch.Tensor]:
    """One update's accumulated gradients, as the loop computes them."""
    for parameter in parameters:
        parameter.grad = None
    steps.prepare(model, [rows])
    for micro in range(steps.grad_accum):
        scaled, _, _ = steps.loss(model, micro)
        scaled.backward()
    return [parameter.grad.clone() for parameter in parameters]


def _assert_same_gradients(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    scale = max(float(grad.abs().max()) for grad in expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("objective", ["dapo", "dr_grpo", "grpo"])
def test_grpo_at_batch_8_and_at_batch_4_with_grad_accum_2_gives_the_same_gradient(
        random_model, tokenizer, arithmetic, tmp_path, objective):
    """One generation batch of 8 prompts x 4 completions, built once; the update as one micro-batch and as two.

    ``dapo`` defines its loss as one sum over every completion token of the batch over their count (Yu et al.
    2025, eq. 8), so two micro-batches of 4 prompts with T1 and T2 completion tokens weigh T1 / (T1 + T2) and
    T2 / (T1 + T2), not 1/2 each: the plain average of the two micro-batch means, what ``grad_accum`` gave
    before, is checked to differ. ``dr_grpo`` and ``grpo`` average over completions, 16 in each micro-batch,
    so their halves weigh 1/2 each.
    """
    rows = arithmetic[0][:8]
    options = GRPOOptions(data=rows, batch_size=8, num_generations=4, max_new_tokens=8, objective=objective,
                          dynamic_sampling=False, beta=0.04, rewards={"length": 1.0})
    step = GRPOStep(options, tokenizer, {"length": 1.0}, ReferenceModel(random_model),
                    find_objective(objective, POLICY_GRADIENT))
    torch.manual_seed(0)
    with torch.no_grad():
        buffer = step.collect(random_model, rows)
    accelerator = make_accelerator("no", tmp_path)
    parameters = [parameter for parameter in random_model.parameters()]

    def gradients(grad_accum: int) -> list[torch.Tensor]:
        collected = copy.deepcopy(buffer)
        steps = OnPolicySteps(lambda model, prompts: collected, step.loss, grad_accum, accelerator)
        return _gradients(steps, random_model, parameters, rows)

    whole = gradients(1)
    _assert_same_gradients(gradients(2), whole)
    if objective == "dapo":
        first, second = copy.deepcopy(buffer).next_update(2)
        assert first.weight != second.weight, "the halves must differ in tokens for the check to tell"
        for parameter in parameters:
            parameter.grad = None
        ((step.loss(random_model, first)[0] + step.loss(random_model, second)[0]) / 2).backward()
        with pytest.raises(AssertionError):
            _assert_same_gradients([parameter.grad for parameter in parameters], whole)


def test_ppo_with_grad_accum_2_gives_the_gradient_of_the_whole_minibatch(random_model, tokenizer, arithmetic,
                                                                         tmp_path):
    """Both PPO losses are token means, so a minibatch cut in two weighs each half by its tokens."""
    rows = arithmetic[0][:4]
    options = PPOOptions(data=rows, rewards={"length": 1.0}, batch_size=4, samples=2, ppo_epochs=1,
                         max_new_tokens=8)
    value_head = ValueHead(32)
    step = PPOStep(options, tokenizer, lambda prompts, completions: torch.tensor([float(len(c)) for c in completions]),
                   ReferenceModel(random_model), value_head, find_objective("dapo", POLICY_GRADIENT))
    torch.manual_seed(0)
    with torch.no_grad():
        buffer = step.collect(random_model, rows)
    accelerator = make_accelerator("no", tmp_path)
    parameters = list(random_model.parameters()) + list(value_head.parameters())

    def gradients(grad_accum: int) -> list[torch.Tensor]:
        collected = copy.deepcopy(buffer)
        steps = OnPolicySteps(lambda model, prompts: collected, step.loss, grad_accum, accelerator)
        return _gradients(steps, random_model, parameters, rows)

    _assert_same_gradients(gradients(2), gradients(1))


@pytest.mark.parametrize("stage, options", [
    ("grpo", {"num_generations": 4, "num_iterations": 2, "beta": 0.04, "objective": "dapo"}),
    ("ppo", {"samples": 2, "ppo_epochs": 2, "grad_accum": 2}),
])
def test_a_run_killed_between_two_updates_of_a_generation_batch_resumes_exactly(
        random_model, tokenizer, arithmetic, tmp_path, stage, options):
    """SIGKILL when step 2 is logged: the newest checkpoint is step 1's, one update into a generation batch of
    two (its rollout buffer saved with ``done == 1``). The resumed run ends with every tensor of the stage
    folder (the policy and, for ppo, the value head) equal to an uninterrupted run's, and logs the same losses."""
    model_dir = tmp_path / "model"
    random_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    options = {"data": arithmetic[0][:16], "rewards": {"length": 1.0}, "batch_size": 2, "max_new_tokens": 6,
               "max_steps": 4, "lr": 1e-3, "log_every": 1, "eval_size": 0, "save_every": 1, **options}
    polm.Pipeline(str(model_dir), seed=0).add(stage, **options).run(tmp_path / "whole")
    spec = {"model": str(model_dir), "stages": [[stage, options]], "run_dir": str(tmp_path / "split")}

    killed = run_in_child(tmp_path, {**spec, "kill_at": [f"00-{stage}", 2], "resume": False})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stage_dir = tmp_path / "split" / f"00-{stage}"
    assert sorted(path.name for path in stage_dir.glob("checkpoint-*")) == ["checkpoint-000001"]
    saved = torch.load(stage_dir / "checkpoint-000001" / "rollout_buffer.pt", weights_only=False)
    assert [state["done"] for state in saved] == [1], "killed between the two updates of a generation batch"

    resumed = run_in_child(tmp_path, {**spec, "kill_at": None, "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, actual = final_tensors(tmp_path / "whole" / f"00-{stage}"), final_tensors(stage_dir)
    assert actual.keys() == expected.keys() and expected
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key

    def losses(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / f"00-{stage}" / "metrics.jsonl").read_text().splitlines()
        return [(record["step"], record["loss"]) for record in map(json.loads, lines) if "loss" in record]

    assert losses("split") == losses("whole")


class _ReinforcePlugin:
    """A whole on-policy stage as a plugin adds one, in one class on the engine's public modules: REINFORCE with
    a leave-one-out baseline (Williams 1992; Ahmadian et al. 2024, arXiv:2402.14740)."""

    @polm.hookimpl
    def polm_register_stages(self, register):
        from dataclasses import dataclass

        from polm.engine.option_groups import DataOptions, RewardOptions, SamplingOptions
        from polm.engine.options import StageOptions
        from polm.engine.rewards import score_weighted
        from polm.engine.rl import RolloutBuffer, completion_token_logps, rloo_advantages, sample
        from polm.engine.stage import Stage
        from polm.engine.trainer import OnPolicyTask, train

        @dataclass
        class ReinforceOptions(StageOptions, DataOptions, SamplingOptions, RewardOptions):
            samples: int = 2

        class Reinforce(Stage):
            Options = ReinforceOptions

            def run(self, context):
                options = self.options

                def collect(policy, rows):
                    k = options.samples
                    rollout = sample(policy, context.tokenizer, [row["prompt"] for row in rows], num_samples=k,
                                     max_new_tokens=options.max_new_tokens, temperature=options.temperature)
                    rewards, _ = score_weighted(options.reward_weights(), [r for r in rows for _ in range(k)],
                                                rollout.texts, options.reward_options)
                    advantages = rloo_advantages(torch.tensor(rewards).view(-1, k)).flatten()  # (N,)
                    return RolloutBuffer({"rollout": rollout, "advantages": advantages}, torch.ones(len(rewards)),
                                         [list(range(len(rewards)))], {"reward": sum(rewards) / len(rewards)})

                def loss(policy, batch):
                    rollout = batch["rollout"]
                    logps, _ = completion_token_logps(policy, rollout)  # (N, C)
                    per_completion = (logps * rollout.completion_mask.to(logps.dtype)).sum(-1)  # (N,)
                    return -(batch["advantages"] * per_completion).mean(), {}, int(rollout.attention_mask.sum())

                task = OnPolicyTask(rows=options.data, collect=collect, loss=loss)
                return train(self.name, context, options, task)

        register("reinforce_test", Reinforce, description="REINFORCE, leave-one-out baseline (test)")


def test_a_plugin_adds_an_on_policy_stage_in_one_class(random_model, tokenizer, arithmetic, tmp_path):
    """The loop samples, scores and steps the plugin's stage like the built-in ones: the policy moves and each
    generation batch's reward is logged."""
    plugin = _ReinforcePlugin()
    polm.plugin_manager().register(plugin, name="test-reinforce")
    try:
        before = [parameter.detach().clone() for parameter in random_model.parameters()]
        polm.Pipeline(random_model, tokenizer=tokenizer).add(
            "reinforce_test", data=arithmetic[0][:4], rewards={"length": 1.0}, batch_size=2, max_new_tokens=4,
            temperature=1.0, max_steps=2, lr=1e-3, log_every=1, eval_size=0).run(tmp_path / "run")
    finally:
        polm.plugin_manager().unregister(name="test-reinforce")
    lines = (tmp_path / "run/00-reinforce_test/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [("reward" in record, "loss" in record) for record in records] == [(True, True), (True, True)]
    assert any(not torch.equal(old, new) for old, new in zip(before, random_model.parameters()))
