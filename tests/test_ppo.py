"""PPO: GAE, the KL-penalised rewards and the clipped losses by hand; the ppo stage's plumbing on a tiny model.

Plumbing runs use the random two-layer Llama of ``random_model`` and a throwaway reward (the completion's
length in characters / 10), so that rollouts differ in score.
"""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.engine.objectives import POLICY_GRADIENT, find_objective
from polm.engine.rl import ReferenceModel, clipped_policy_loss, gae, whiten
from polm.plugins.alignment.ppo import PPOOptions, PPOStage, ValueHead, kl_penalised_rewards, ppo_value_loss
from polm.plugins.alignment.ppo.stage import PPOStep

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]


def test_gae_matches_hand_computation():
    """Two completions of T = 3 tokens; the second has 2 tokens (its third position is padding).

    gamma = 1, lam = 1/2. Row 0: r = (0, 0, 1), V = (1/2, 1/4, 1/2).
      t=2: delta = 1 + 0 - 1/2 = 1/2 (V after the last token is 0);           A = 1/2
      t=1: delta = 0 + 1/2 - 1/4 = 1/4;  A = 1/4 + 1/2 * 1/2 = 1/2
      t=0: delta = 0 + 1/4 - 1/2 = -1/4; A = -1/4 + 1/2 * 1/2 = 0
      returns A + V = (1/2, 3/4, 1).
    Row 1: r = (0, 2, pad), V = (1, 1, 9 on padding, ignored).
      t=1: delta = 2 + 0 - 1 = 1; A = 1.   t=0: delta = 0 + 1 - 1 = 0; A = 0 + 1/2 * 1 = 1/2
      returns (3/2, 2, 0); padding gets 0.
    gamma = 1/2, lam = 1 gives Monte Carlo advantages: row 0's returns are the discounted sums
    (1/4, 1/2, 1), so A = (1/4 - 1/2, 1/2 - 1/4, 1 - 1/2) = (-1/4, 1/4, 1/2).
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.5], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert_close(advantages, torch.tensor([[0.0, 0.5, 0.5], [0.5, 1.0, 0.0]]))
    assert_close(returns, torch.tensor([[0.5, 0.75, 1.0], [1.5, 2.0, 0.0]]))
    advantages, returns = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    assert_close(advantages, torch.tensor([[-0.25, 0.25, 0.5]]))
    assert_close(returns, torch.tensor([[0.25, 0.5, 1.0]]))


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    """kl_coef = 1/2. Row 0 (3 tokens): logp - ref = (0.2, -0.4, 0.6) gives -0.5 x = (-0.1, 0.2, -0.3),
    plus its score 1 on token 3: (-0.1, 0.2, 0.7). Row 1 (1 token): -0.5 * 1 + score -1 = -1.5; padding 0."""
    logps = torch.tensor([[0.2, -0.4, 0.6], [1.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = kl_penalised_rewards(torch.tensor([1.0, -1.0]), logps, torch.zeros(2, 3), mask, kl_coef=0.5)
    assert_close(rewards, torch.tensor([[-0.1, 0.2, 0.7], [-1.5, 0.0, 0.0]]))


def test_whiten_uses_masked_positions_only():
    """Values 1, 3 (masked in) and 100 (padding): mean 2, variance 1, so (-1, 1) and 0 on padding."""
    out = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]), eps=0.0)
    assert_close(out, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_clipped_policy_loss_matches_hand_computation():
    """eps = 0.2, old log-probs 0, so ratio = exp(logp). Four tokens and one padding token.

    =====  =====  ==  ==============  ============  ========  =======
    token  ratio  A   -A ratio        -A clip       max       clipped
    =====  =====  ==  ==============  ============  ========  =======
    a      1.5    1   -1.5            -1.2          -1.2      yes
    b      0.5    1   -0.5            -0.8          -0.5      no
    c      0.5    -2  1.0             1.6           1.6       yes
    d      1.1    -1  1.1             1.1           1.1       no (equal)
    =====  =====  ==  ==============  ============  ========  =======

    Loss = (-1.2 - 0.5 + 1.6 + 1.1) / 4 = 0.25; clip fraction 2/4. Gradient w.r.t. logp: 0 where the clipped
    term wins, else -A ratio / 4: b -0.125, d +0.275. approx_kl = mean(ln(ratio)^2 / 2).
    """
    ratios = torch.tensor([[1.5, 0.5], [0.5, 1.1]])
    logps = torch.log(torch.cat([ratios, torch.tensor([[7.0], [7.0]])], 1)).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, 5.0], [-2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, metrics = clipped_policy_loss(logps, torch.zeros(2, 3), advantages, mask, epsilon_low=0.2,
                                        epsilon_high=0.2, loss_type="dapo")
    assert_close(loss, torch.tensor(0.25))
    assert metrics["clip_fraction"] == 0.5
    expected_kl = torch.tensor(sum(math.log(r) ** 2 / 2 for r in (1.5, 0.5, 0.5, 1.1)) / 4)
    assert_close(metrics["approx_kl"], expected_kl, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert_close(logps.grad, torch.tensor([[0.0, -0.125, 0.0], [0.0, 0.275, 0.0]]))


def test_clipped_value_loss_matches_hand_computation():
    """eps = 0.2, old values 0, returns 1.

    V = 0.5: clipped to 0.2, errors (0.5-1)^2 = 0.25 and (0.2-1)^2 = 0.64: 0.64 (the clipped one).
    V = -0.1: inside the range, 1.21 either way. V = -0.5: clipped to -0.2, errors 2.25 and 1.44: 2.25.
    Loss = (0.64 + 1.21 + 2.25) / 3 / 2 = 4.1 / 6; value clip fraction 1/3.
    """
    values = torch.tensor([[0.5, -0.1, -0.5]])
    loss, metrics = ppo_value_loss(values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), clip_range=0.2)
    assert_close(loss, torch.tensor(4.1 / 6))
    assert_close(metrics["value_clip_fraction"], 1 / 3)


class _LengthReward:
    """A throwaway reward plugin: a completion's length in characters / 10."""

    @polm.hookimpl
    def polm_register_rewards(self, register):
        register("test_length", lambda prompts, completions, **fields: [len(c) / 10 for c in completions])


@pytest.fixture
def length_reward():
    polm.plugin_manager().register(_LengthReward(), name="test-length-reward")
    try:
        yield "test_length"
    finally:
        polm.plugin_manager().unregister(name="test-length-reward")


def training_records(stage_dir):
    return [r for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def ppo_options(reward, **overrides):
    options = {"data": PROMPTS, "rewards": {reward: 1.0}, "max_steps": 4, "batch_size": 2, "samples": 2,
               "ppo_epochs": 2, "minibatches": 1, "max_new_tokens": 6, "lr": 1e-3, "log_every": 1, "eval_size": 0}
    return {**options, **overrides}


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_ppo_logs_its_metrics_and_saves_a_plain_policy_and_a_value_head(random_model, tokenizer, tmp_path,
                                                                         length_reward, tuning):
    """Each step logs the losses; the step that samples a rollout also logs its score and KL, once, and the
    next step (ppo_epochs = 2) replays it.

    The policy's folder loads with plain transformers; the value head is saved beside it.
    """
    from transformers import AutoModelForCausalLM

    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "ppo", tuning=tuning, **ppo_options(length_reward)).run(tmp_path / "run")
    logged = training_records(tmp_path / "run" / "00-ppo")
    assert {"loss", "policy_loss", "value_loss", "score", "kl", "clip_fraction", "value_clip_fraction",
            "approx_kl"} <= logged[0].keys()
    assert [("score" in record) for record in logged] == [True, False, True, False], "a rollout every 2 steps"
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-5), "the first rollout comes from the reference itself"
    assert math.isfinite(logged[2]["kl"])
    assert logged[0]["clip_fraction"] == 0.0, "the first update of a rollout has ratio 1"
    stage_dir = tmp_path / "run" / "00-ppo"
    if tuning == "full":
        AutoModelForCausalLM.from_pretrained(result.checkpoint)
    head = ValueHead(32)
    head.load(stage_dir)
    assert head.linear.weight.abs().sum() > 0, "the value head trained"
    assert PPOStage.headline_metric == "reward"


def test_prompt_baseline_scores_each_sample_against_the_other_samples_of_its_prompt(random_model, tokenizer):
    """Two prompts, two samples each, scores (1, 3) and (0, 4): each loses the mean of the other samples of
    its prompt, giving (-2, 2) and (-4, 4). With no KL penalty, gamma = lambda = 1, the zero-initialised
    value head and no whitening, the advantage of every sampled token is its completion's shaped score."""
    options = PPOOptions(**ppo_options("accuracy", prompt_baseline=True, kl_coef=0.0, lam=1.0,
                                       whiten_advantages=False))
    step = PPOStep(options, tokenizer, lambda rows, completions: torch.tensor([1.0, 3.0, 0.0, 4.0]),
                   ReferenceModel(random_model), ValueHead(32), find_objective("dapo", POLICY_GRADIENT))
    with torch.no_grad():  # as the training loop calls it
        buffer = step.collect(random_model, PROMPTS[:2])
    mask = buffer.fields["rollout"].completion_mask.float()
    expected = torch.tensor([-2.0, 2.0, -4.0, 4.0])[:, None] * mask
    assert_close(buffer.fields["advantages"], expected)
    assert buffer.metrics["score"] == 2.0, "the logged score is the reward model's, before the baseline"


def test_ppo_resumes_exactly_in_the_middle_of_a_rollout(random_model, tokenizer, tmp_path, length_reward):
    """Stopped after step 3 (the first update of the second rollout), resumed: the same losses as a run
    that never stopped, because the checkpoint holds the value head and the rollout buffer."""
    options = ppo_options(length_reward, save_every=0)
    polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer).add("ppo", **options).run(tmp_path / "whole")
    stop = threading.Event()

    def stop_after_step_3(record):
        if record.get("step") == 3 and "loss" in record:
            stop.set()

    pipeline = polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer).add("ppo", **options)
    first = pipeline.run(tmp_path / "split", on_log=stop_after_step_3, stop=stop)
    assert first.interrupted
    assert (tmp_path / "split" / "00-ppo" / "checkpoint-000003" / "rollout_buffer.pt").is_file()
    polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer).add("ppo", **options).run(
        tmp_path / "split", resume=True)
    whole = [r["loss"] for r in training_records(tmp_path / "whole" / "00-ppo")]
    split = [r["loss"] for r in training_records(tmp_path / "split" / "00-ppo")]
    assert_close(split, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"rewards": {}}, "option 'rewards' names no reward"),
    ({"rewards": {"acuracy": 1.0}}, r"unknown reward 'acuracy'\. Did you mean 'accuracy'\?"),
    ({"rewards": {"accuracy": 1.0}, "batch_size": 3, "minibatches": 2}, r"'minibatches' \(2\) must divide"),
    ({"rewards": {"accuracy": 1.0}, "prompt_baseline": True}, "set 'samples' to 2 or more"),
])
def test_bad_ppo_options_fail_when_the_stage_is_added(options, message):
    with pytest.raises(polm.PolmError, match=message):
        polm.Pipeline("polm-tiny").add("ppo", data="polm:arithmetic", **options)
