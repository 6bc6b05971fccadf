"""Preference objectives: each checked against numbers worked out by hand.

The pairwise cases share two pairs. With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

========  ============  ===============  ==========  =============  ===========================
pair      policy_chosen  policy_rejected  ref_chosen  ref_rejected   h
========  ============  ===============  ==========  =============  ===========================
0         -1             -3               -2          -2             (−1 + 2) − (−3 + 2) = 2
1         -3             -2               -2          -2             (−3 + 2) − (−2 + 2) = −1
========  ============  ===============  ==========  =============  ===========================

With ``beta = ln 3``: sigmoid(2 ln 3) = 9/10 and sigmoid(-ln 3) = 1/4.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.plugins.alignment.objectives import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

LN3 = math.log(3.0)


def pairs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    policy_chosen = torch.tensor([-1.0, -3.0], requires_grad=requires_grad)
    policy_rejected = torch.tensor([-3.0, -2.0], requires_grad=requires_grad)
    return policy_chosen, policy_rejected, torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def test_dpo_loss_metrics_and_gradients_match_hand_computation():
    """DPO: loss_i = -log sigmoid(beta h_i), mean over pairs.

    beta h = (2 ln 3, -ln 3): losses ln(10/9) and ln 4, mean (ln(10/9) + ln 4) / 2.
    Rewards beta (policy - ref): chosen (ln 3, -ln 3), rejected (-ln 3, 0): pair 0 won, pair 1 lost,
    accuracy 1/2; margin mean(2 ln 3, -ln 3) = ln 3 / 2; chosen mean 0, rejected mean -ln 3 / 2.
    Gradient: d loss / d policy_chosen_i = -(beta / B) sigmoid(-beta h_i) = -(ln 3 / 2)(1/10, 3/4)
    = (-ln 3 / 20, -3 ln 3 / 8); policy_rejected gets the opposite.
    """
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = pairs(requires_grad=True)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=LN3)
    assert_close(loss, scalar((math.log(10 / 9) + math.log(4)) / 2))
    assert metrics["reward_accuracy"] == 0.5
    assert_close(metrics["reward_margin"], LN3 / 2, rtol=1e-6, atol=1e-6)
    assert_close(metrics["chosen_reward"], 0.0, rtol=0, atol=1e-6)
    assert_close(metrics["rejected_reward"], -LN3 / 2, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert_close(policy_chosen.grad, torch.tensor([-LN3 / 20, -3 * LN3 / 8]))
    assert_close(policy_rejected.grad, torch.tensor([LN3 / 20, 3 * LN3 / 8]))


def test_conservative_dpo_smooths_labels_and_equals_dpo_without_smoothing():
    """cDPO with eps = 0.1: loss_i = -0.9 log sigmoid(beta h_i) - 0.1 log sigmoid(-beta h_i).

    Pair 0: 0.9 ln(10/9) + 0.1 ln 10; pair 1: 0.9 ln 4 + 0.1 ln(4/3). With eps = 0 it is plain DPO.
    """
    loss, _ = dpo_loss(*pairs(), beta=LN3, label_smoothing=0.1)
    expected = ((0.9 * math.log(10 / 9) + 0.1 * math.log(10)) + (0.9 * math.log(4) + 0.1 * math.log(4 / 3))) / 2
    assert_close(loss, scalar(expected))
    plain, plain_metrics = dpo_loss(*pairs(), beta=LN3)
    smoothed_zero, zero_metrics = dpo_loss(*pairs(), beta=LN3, label_smoothing=0.0)
    assert_close(smoothed_zero, plain)
    assert zero_metrics == plain_metrics


def test_ipo_loss_regresses_the_margin_onto_its_target():
    """IPO with beta = 1/2: target margin 1/(2 beta) = 1; losses (2 - 1)^2 = 1 and (-1 - 1)^2 = 4, mean 5/2.

    Rewards beta (policy - ref): chosen (1/2, -1/2), rejected (-1/2, 0): accuracy 1/2, margin (1 - 1/2)/2 = 1/4.
    """
    loss, metrics = ipo_loss(*pairs(), beta=0.5)
    assert_close(loss, scalar(2.5))
    assert metrics["reward_accuracy"] == 0.5
    assert_close(metrics["reward_margin"], 0.25)


def test_hinge_loss_is_zero_beyond_the_margin():
    """SLiC hinge max(0, 1 - beta h): beta = 1 gives (0, 2), mean 1; beta = 1/2 gives (0, 3/2), mean 3/4."""
    loss, metrics = hinge_loss(*pairs(), beta=1.0)
    assert_close(loss, scalar(1.0))
    assert metrics["reward_accuracy"] == 0.5
    half, _ = hinge_loss(*pairs(), beta=0.5)
    assert_close(half, scalar(0.75))


def test_robust_dpo_loss_subtracts_the_flipped_label_loss():
    """rDPO with eps = 1/4, beta = ln 3: loss_i = (3/4 l(beta h) - 1/4 l(-beta h)) / (1/2), l = -log sigmoid.

    Pair 0: 1.5 ln(10/9) - 0.5 ln 10 (negative: the flipped label is unlikely); pair 1: 1.5 ln 4 - 0.5 ln(4/3).
    With eps = 0 it is plain DPO.
    """
    loss, metrics = robust_dpo_loss(*pairs(), beta=LN3, label_smoothing=0.25)
    expected = ((1.5 * math.log(10 / 9) - 0.5 * math.log(10)) + (1.5 * math.log(4) - 0.5 * math.log(4 / 3))) / 2
    assert_close(loss, scalar(expected))
    assert metrics["reward_accuracy"] == 0.5
    assert_close(robust_dpo_loss(*pairs(), beta=LN3, label_smoothing=0.0)[0], dpo_loss(*pairs(), beta=LN3)[0])


def test_simpo_loss_on_average_log_probs():
    """SimPO with beta = 2, gamma = 1 on average log-probs chosen (-1/2, -1), rejected (-1, -1).

    Pair 0: 2 (-1/2 + 1) - 1 = 0, loss ln 2; pair 1: 2 * 0 - 1 = -1, loss -log sigmoid(-1) = ln(1 + e).
    Rewards beta * average: chosen (-1, -2), rejected (-2, -2): pair 1 is a tie, not a win: accuracy 1/2;
    margin (1 + 0)/2 = 1/2.
    """
    chosen, rejected = torch.tensor([-0.5, -1.0]), torch.tensor([-1.0, -1.0])
    loss, metrics = simpo_loss(chosen, rejected, None, None, beta=2.0, gamma=1.0)
    assert_close(loss, scalar((math.log(2) + math.log(1 + math.e)) / 2))
    assert metrics["reward_accuracy"] == 0.5
    assert_close(metrics["reward_margin"], 0.5)
    assert_close(metrics["chosen_reward"], -1.5)


def test_orpo_loss_adds_the_odds_ratio_term_to_the_chosen_nll():
    """ORPO with lambda = 1/2 on average log-probs chosen (ln 1/2, ln 1/4), rejected (ln 1/4, ln 1/2).

    odds(1/2) = 1 (log 0), odds(1/4) = 1/3 (log -ln 3). Log odds ratios: (ln 3, -ln 3), so the
    odds-ratio losses are -log sigmoid(ln 3) = ln(4/3) and -log sigmoid(-ln 3) = ln 4.
    NLL of chosen: mean(ln 2, ln 4) = 1.5 ln 2. Loss = 1.5 ln 2 + (1/2)(ln(4/3) + ln 4)/2.
    """
    chosen = torch.log(torch.tensor([0.5, 0.25]))
    rejected = torch.log(torch.tensor([0.25, 0.5]))
    loss, metrics = orpo_loss(chosen, rejected, None, None, lambda_=0.5)
    assert_close(loss, scalar(1.5 * math.log(2) + 0.5 * (math.log(4 / 3) + math.log(4)) / 2))
    assert_close(metrics["nll"], 1.5 * math.log(2))
    assert_close(metrics["log_odds_ratio"], 0.0, rtol=0, atol=1e-6)
    assert metrics["reward_accuracy"] == 0.5


@pytest.mark.parametrize("objective", [simpo_loss, orpo_loss])
def test_reference_free_objectives_take_none_and_refuse_reference_tensors(objective):
    """Reference-free objectives accept None for the reference and reject tensors rather than ignore them."""
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-2.0])
    loss, metrics = objective(chosen, rejected, None, None)
    assert loss.dim() == 0 and metrics["reward_accuracy"] == 1.0
    with pytest.raises(ValueError, match="reference-free"):
        objective(chosen, rejected, torch.tensor([-1.0]), torch.tensor([-1.0]))


@pytest.mark.parametrize("objective, options, message", [
    (dpo_loss, {"beta": 0.0}, "'beta' must be positive"),
    (dpo_loss, {"label_smoothing": 0.5}, r"'label_smoothing' must be in \[0, 0.5\)"),
    (robust_dpo_loss, {"label_smoothing": -0.1}, "'label_smoothing'"),
    (ipo_loss, {"beta": -1.0}, "'beta'"),
])
def test_objectives_reject_bad_hyperparameters(objective, options, message):
    with pytest.raises(ValueError, match=message):
        objective(*pairs(), **options)


def test_kto_loss_on_unpaired_rows():
    """KTO with beta = ln 3, reference point z0 = 1, desirable weight 1, undesirable weight 2.

    Rows r = policy - ref = (2, 1, 0), labels (desirable, desirable, undesirable):
    desirable r = 2: 1 - sigmoid(ln 3 (2 - 1)) = 1/4; desirable r = 1: 1 - sigmoid(0) = 1/2;
    undesirable r = 0: 2 (1 - sigmoid(ln 3 (1 - 0))) = 2 / 4 = 1/2. Mean (1/4 + 1/2 + 1/2) / 3 = 5/12.
    Rewards beta r: chosen mean ln 3 (2 + 1)/2 = 1.5 ln 3, rejected 0. Accuracy: r - z0 = (1, 0, -1) with the
    label's sign for rows 0 and 2 (row 1 sits on the reference point): 2/3.
    """
    policy = torch.tensor([-1.0, -2.0, -3.0])
    reference = torch.tensor([-3.0, -3.0, -3.0])
    labels = torch.tensor([True, True, False])
    loss, metrics = kto_loss(policy, reference, labels, 1.0, beta=LN3, desirable_weight=1.0, undesirable_weight=2.0)
    assert_close(loss, scalar(5 / 12))
    assert_close(metrics["chosen_reward"], 1.5 * LN3)
    assert metrics["rejected_reward"] == 0.0
    assert_close(metrics["reward_accuracy"], 2 / 3)
    assert metrics["kl"] == 1.0


def test_kto_reference_point_is_a_detached_clamped_kl_estimate():
    """z0 = max(0, mean(policy - ref)): mean(1, 2) = 3/2; mean(-1, -2) clamps to 0; no gradient flows into it."""
    policy = torch.tensor([0.0, 0.0], requires_grad=True)
    z0 = kl_estimate(policy, torch.tensor([-1.0, -2.0]))
    assert_close(z0, scalar(1.5))
    assert not z0.requires_grad
    assert kl_estimate(policy, torch.tensor([1.0, 2.0])).item() == 0.0


def test_objectives_are_registered_with_their_family():
    """The built-ins are in the objectives registry; the reference-free ones say so in their metadata."""
    from polm.engine.plugins import registry

    objectives = registry("objectives")
    for name in ("dpo", "ipo", "hinge", "robust", "simpo", "orpo"):
        assert objectives.entry(name).metadata["family"] == "pairwise"
    assert {n for n in ("simpo", "orpo", "dpo") if objectives.entry(n).metadata.get("reference_free")} == {
        "simpo", "orpo"}
    assert objectives.entry("kto").metadata["family"] == "unpaired"
    assert polm.components("objectives")["dpo"] is dpo_loss
