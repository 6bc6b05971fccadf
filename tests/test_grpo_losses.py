"""GRPO's advantages and clipped objective against numbers worked out by hand, and where the variants differ."""

from __future__ import annotations

import math

import pytest
import torch

from polm.engine.rl import (
    aggregate,
    clipped_policy_loss,
    group_advantages,
    informative_groups,
    k3_kl,
    rloo_advantages,
)
from polm.plugins.reasoning.grpo.options import GRPOOptions


def test_group_advantages_by_hand():
    """Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735,
    A = +-0.5 / (0.57735 + 1e-4) = +-0.86588. Group [2, 2, 2, 2]: std 0, A = 0.
    Without scaling (Dr. GRPO): A = r - mean = [0.5, -0.5, -0.5, 0.5] and [0, 0, 0, 0]."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(group_advantages(rewards),
                               torch.tensor([[0.86588, -0.86588, -0.86588, 0.86588], [0.0, 0.0, 0.0, 0.0]]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(rewards, scale=False),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))


def test_rloo_advantages_by_hand():
    """Group [4, 1, 1]: the others' means are (1+1)/2 = 1, (4+1)/2 = 2.5, 2.5, so A = [3, -1.5, -1.5]
    (= G/(G-1) * (r - mean) = 1.5 * [2, -1, -1]). Group [1, 0, 0]: the others' means are 0, 0.5, 0.5,
    so A = [1, -0.5, -0.5]."""
    rewards = torch.tensor([[4.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(rloo_advantages(rewards), torch.tensor([[3.0, -1.5, -1.5], [1.0, -0.5, -0.5]]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([[1.0]]))


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.2, 0.2, 0.3]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


def _case():
    """Two completions of two token slots; old log-probs 0, so ratio = exp(logp).

    Completion 0: A = +1, ratios [1.5, 0.9], both tokens real.
    Completion 1: A = -2, ratios [0.5, 1.1], only the first token real.
    """
    logps = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.1]])).requires_grad_(True)
    old = torch.zeros(2, 2)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logps, old, advantages, mask


def test_clipped_objective_by_hand():
    """Per token -min(ratio * A, clip(ratio, 0.8, 1.2) * A):
    completion 0: token 0 -min(1.5, 1.2) = -1.2 (clipped), token 1 -min(0.9, 0.9) = -0.9;
    completion 1: token 0 -min(-1.0, -1.6) = 1.6 (clipped); token 1 is padding.
    grpo: mean of the per-completion means = ((-1.2 - 0.9) / 2 + 1.6) / 2 = 0.275.
    dapo: token mean = (-1.2 - 0.9 + 1.6) / 3 = -0.16667.
    dr_grpo (budget 4 tokens): token sum over N * 4 = -0.5 / 8 = -0.0625.
    Clipped tokens: 2 of 3. Gradient of grpo w.r.t. the logp of completion 0's token 1:
    d(-ratio * A / 2 / 2)/dlogp = -0.9 / 4 = -0.225; the clipped tokens pass none."""
    expected = {"grpo": 0.275, "dapo": -0.5 / 3, "dr_grpo": -0.0625}
    for loss_type, value in expected.items():
        logps, old, advantages, mask = _case()
        loss, metrics = clipped_policy_loss(logps, old, advantages, mask, loss_type=loss_type, max_completion_length=4)
        torch.testing.assert_close(loss, torch.tensor(value), msg=loss_type)
        torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(2 / 3))
    logps, old, advantages, mask = _case()
    clipped_policy_loss(logps, old, advantages, mask)[0].backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.225], [0.0, 0.0]]))


def test_clip_higher_moves_only_the_upper_bound():
    """epsilon_high 0.28 clips completion 0's ratio 1.5 at 1.28 instead of 1.2: its token loss becomes -1.28,
    grpo = ((-1.28 - 0.9) / 2 + 1.6) / 2 = 0.255; completion 1 (clipped below, at 0.8) is unchanged."""
    logps, old, advantages, mask = _case()
    loss, _ = clipped_policy_loss(logps, old, advantages, mask, epsilon_high=0.28)
    torch.testing.assert_close(loss, torch.tensor(0.255))


def test_k3_kl_by_hand_and_its_weight():
    """logp = log 0.5, ref = log 0.25: delta = ref - logp = -log 2, k3 = 0.5 + log 2 - 1 = 0.19315.
    With ratio 1 and A = 0 the policy term is 0, so the loss is beta * k3 = 0.1 * 0.19315."""
    logps = torch.log(torch.full((1, 1), 0.5))
    ref = torch.log(torch.full((1, 1), 0.25))
    torch.testing.assert_close(k3_kl(logps, ref), torch.tensor([[0.5 + math.log(2) - 1]]))
    loss, metrics = clipped_policy_loss(logps, logps, torch.zeros(1), torch.ones(1, 1), ref_logps=ref, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.1 * (0.5 + math.log(2) - 1)))
    torch.testing.assert_close(metrics["kl"], torch.tensor(0.5 + math.log(2) - 1))
    with pytest.raises(ValueError, match="ref_logps"):
        clipped_policy_loss(logps, logps, torch.zeros(1), torch.ones(1, 1), beta=0.1)


def test_variants_differ_only_in_their_length_normalisation():
    """With equal completion lengths L, grpo's and dapo's means agree and dr_grpo is grpo * L / budget;
    with unequal lengths grpo (mean of means) and dapo (mean of tokens) part."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    equal = torch.ones(2, 3)
    grpo = aggregate(per_token, equal, "grpo")
    torch.testing.assert_close(aggregate(per_token, equal, "dapo"), grpo)
    torch.testing.assert_close(aggregate(per_token, equal, "dr_grpo", max_completion_length=6), grpo * 3 / 6)
    unequal = torch.tensor([[1, 0, 0], [1, 1, 1]])
    # grpo: (1 + 5) / 2 = 3; dapo: (1 + 4 + 5 + 6) / 4 = 4; dr_grpo: 16 / (2 * 3) = 2.6667.
    torch.testing.assert_close(aggregate(per_token, unequal, "grpo"), torch.tensor(3.0))
    torch.testing.assert_close(aggregate(per_token, unequal, "dapo"), torch.tensor(4.0))
    torch.testing.assert_close(aggregate(per_token, unequal, "dr_grpo", max_completion_length=3), torch.tensor(16 / 6))


@pytest.mark.parametrize("objective, epsilon_high, dynamic_sampling", [
    ("grpo", 0.2, False), ("dr_grpo", 0.2, False), ("dapo", 0.28, True),
])
def test_each_variant_sets_its_own_defaults(objective, epsilon_high, dynamic_sampling):
    options = GRPOOptions(data="polm:arithmetic", objective=objective)
    assert (options.epsilon_high, options.dynamic_sampling) == (epsilon_high, dynamic_sampling)
    explicit = GRPOOptions(data="polm:arithmetic", objective=objective, epsilon_high=0.3, dynamic_sampling=False)
    assert (explicit.epsilon_high, explicit.dynamic_sampling) == (0.3, False)
