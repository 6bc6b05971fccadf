"""Distillation objectives: each checked against numbers worked out by hand on a vocabulary of 2.

Logits ``(ln 3, 0)`` give ``p = (3/4, 1/4)``, ``(0, ln 3)`` give ``(1/4, 3/4)`` and ``(0, 0)`` give
``(1/2, 1/2)``; at temperature 2, ``(ln 9, 0) / 2 = (ln 3, 0)``. The KLs between them:

======================  ==========================================================  ======================
KL(a || b)              sum_v a_v ln(a_v / b_v)                                     value
======================  ==========================================================  ======================
(3/4,1/4) || (1/2,1/2)  3/4 ln(3/2) + 1/4 ln(1/2)                                   3/4 ln 3 - ln 2
(1/2,1/2) || (3/4,1/4)  1/2 ln(2/3) + 1/2 ln 2                                      ln 2 - 1/2 ln 3
(3/4,1/4) || (1/4,3/4)  3/4 ln 3 + 1/4 ln(1/3)                                      1/2 ln 3 (both ways)
======================  ==========================================================  ======================

A row of ``labels`` (B, T) is ``-100`` where no loss is taken; position ``t`` predicts ``labels[t + 1]``,
so ``labels = [[-100, 0]]`` takes the loss on position 0 alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.engine.errors import PolmError
from polm.engine.lm import completion_loss
from polm.engine.objectives import (
    DISTILLATION,
    LANGUAGE_MODELLING,
    check_objective_options,
    find_objective,
    objectives_of,
)
from polm.plugins.efficiency.distill import forward_kl, jsd, reverse_kl

LN2, LN3 = math.log(2.0), math.log(3.0)
ONE_LABEL = torch.tensor([[-100, 0]])  # (B, T): the loss on position 0, predicting token 0


def logits(*rows: tuple[float, float], requires_grad: bool = False) -> torch.Tensor:
    """(1, T, 2) logits, one row per position."""
    return torch.tensor([list(rows)], requires_grad=requires_grad)


def scalar(value: float) -> torch.Tensor:
    """A float32 scalar, so that a loss or a metric is compared within float32's tolerance."""
    return torch.tensor(value, dtype=torch.float32)


def test_forward_kl_and_its_gradient_match_hand_computation():
    """Teacher (3/4, 1/4), student (1/2, 1/2): KL(teacher || student) = 3/4 ln 3 - ln 2.

    The gradient of KL(p || softmax(z)) in z is softmax(z) - p = (1/2 - 3/4, 1/2 - 1/4) = (-1/4, 1/4) on
    position 0; position 1 predicts nothing and gets none. With alpha = 0 the hard loss is a metric only:
    the student's cross-entropy on token 0, -ln(1/2) = ln 2.
    """
    student = logits((0.0, 0.0), (0.0, 0.0), requires_grad=True)
    loss, metrics = forward_kl(student, logits((LN3, 0.0), (0.0, 0.0)), ONE_LABEL)
    assert_close(loss, scalar(0.75 * LN3 - LN2))
    assert_close(scalar(metrics["distill_loss"]), scalar(0.75 * LN3 - LN2))
    assert_close(scalar(metrics["hard_loss"]), scalar(LN2))
    assert metrics["label_tokens"] == 1.0
    loss.backward()
    assert_close(student.grad, torch.tensor([[[-0.25, 0.25], [0.0, 0.0]]]))


def test_reverse_kl_matches_hand_computation():
    """Teacher (3/4, 1/4), student (1/2, 1/2): KL(student || teacher) = ln 2 - 1/2 ln 3, not the forward
    3/4 ln 3 - ln 2."""
    loss, metrics = reverse_kl(logits((0.0, 0.0), (0.0, 0.0)), logits((LN3, 0.0), (0.0, 0.0)), ONE_LABEL)
    assert_close(loss, scalar(LN2 - 0.5 * LN3))
    assert_close(scalar(metrics["distill_loss"]), scalar(LN2 - 0.5 * LN3))


@pytest.mark.parametrize("objective, expected", [
    (forward_kl, 2 * LN3),
    (reverse_kl, 2 * LN3),
    (jsd, 3 * LN3 - 4 * LN2),
])
def test_temperature_softens_both_models_and_scales_by_its_square(objective, expected):
    """At T = 2, teacher (ln 9, 0) -> (ln 3, 0): (3/4, 1/4); student (0, ln 9) -> (0, ln 3): (1/4, 3/4).

    Both KLs are 1/2 ln 3, times T^2 = 4: 2 ln 3. JSD at beta 1/2: M = (1/2, 1/2), and
    1/2 KL(teacher || M) + 1/2 KL(student || M) = 3/4 ln 3 - ln 2 (each the same by symmetry), times 4:
    3 ln 3 - 4 ln 2. (At T = 1 the distributions would be (9/10, 1/10) and (1/10, 9/10).)
    """
    ln9 = 2 * LN3
    loss, metrics = objective(logits((0.0, ln9), (0.0, 0.0)), logits((ln9, 0.0), (0.0, 0.0)), ONE_LABEL,
                              temperature=2.0)
    assert_close(loss, scalar(expected))
    assert_close(scalar(metrics["distill_loss"]), scalar(expected))


def test_alpha_mixes_in_the_hard_loss_at_temperature_one():
    """alpha = 1/2, T = 2; student (ln 9, 0), teacher (0, 0), label token 1.

    Hard loss at T = 1: the student's p = (9/10, 1/10), -ln(1/10) = ln 10. Soft loss at T = 2: student
    (3/4, 1/4), teacher (1/2, 1/2), KL(teacher || student) = ln 2 - 1/2 ln 3, times 4: 4 ln 2 - 2 ln 3.
    Loss: 1/2 ln 10 + 1/2 (4 ln 2 - 2 ln 3) = 1/2 ln 10 + 2 ln 2 - ln 3. With alpha = 1 it is the
    completion loss alone.
    """
    student, teacher = logits((2 * LN3, 0.0), (0.0, 0.0)), logits((0.0, 0.0), (0.0, 0.0))
    labels = torch.tensor([[-100, 1]])
    loss, metrics = forward_kl(student, teacher, labels, temperature=2.0, alpha=0.5)
    assert_close(loss, scalar(0.5 * math.log(10.0) + 2 * LN2 - LN3))
    assert_close(scalar(metrics["hard_loss"]), scalar(math.log(10.0)))
    assert_close(scalar(metrics["distill_loss"]), scalar(4 * LN2 - 2 * LN3))
    assert_close(forward_kl(student, teacher, labels, temperature=2.0, alpha=1.0)[0],
                 completion_loss(student, labels)[0])


def test_the_loss_is_a_mean_over_labelled_tokens_and_masked_ones_contribute_nothing():
    """Row 0, labels (-100, 0, 1, -100): positions 0 and 1 are labelled, position 2 predicts -100 and the
    last predicts nothing; row 1 is all -100. Positions 2, 3 and row 1 hold teacher and student far apart.

    Position 0: teacher (3/4, 1/4), student (1/2, 1/2): 3/4 ln 3 - ln 2. Position 1: teacher (3/4, 1/4),
    student (1/4, 3/4): 1/2 ln 3. Mean over the 2 labelled tokens: (5/4 ln 3 - ln 2) / 2
    = 5/8 ln 3 - 1/2 ln 2. The masked positions get no gradient.
    """
    far_teacher, far_student = [10.0, -10.0], [-10.0, 10.0]
    student = torch.tensor([[[0.0, 0.0], [0.0, LN3], far_student, far_student], [far_student] * 4],
                           requires_grad=True)  # (2, 4, 2)
    teacher = torch.tensor([[[LN3, 0.0], [LN3, 0.0], far_teacher, far_teacher], [far_teacher] * 4])
    labels = torch.tensor([[-100, 0, 1, -100], [-100, -100, -100, -100]])
    loss, metrics = forward_kl(student, teacher, labels)
    assert_close(loss, scalar(0.625 * LN3 - 0.5 * LN2))
    assert metrics["label_tokens"] == 2.0
    loss.backward()
    assert student.grad[0, :2].abs().sum() > 0
    assert_close(student.grad[0, 2:], torch.zeros(2, 2))
    assert_close(student.grad[1], torch.zeros(4, 2))


def test_jsd_at_one_half_matches_hand_computation():
    """Teacher (3/4, 1/4), student (1/4, 3/4), beta 1/2: M = (1/2, 1/2);
    KL(teacher || M) = KL(student || M) = 3/4 ln 3 - ln 2, so JSD = 3/4 ln 3 - ln 2."""
    loss, _ = jsd(logits((0.0, LN3), (0.0, 0.0)), logits((LN3, 0.0), (0.0, 0.0)), ONE_LABEL, beta=0.5)
    assert_close(loss, scalar(0.75 * LN3 - LN2))


def test_jsd_beta_weighs_the_teacher_in_the_mixture():
    """beta = 1/3, teacher (3/4, 1/4), student (3/8, 5/8) (logits (ln 3, ln 5)): M = 1/3 teacher + 2/3 student
    = (1/4 + 1/4, 1/12 + 5/12) = (1/2, 1/2).

    KL(teacher || M) = 3/4 ln 3 - ln 2; KL(student || M) = 3/8 ln(3/4) + 5/8 ln(5/4)
    = 3/8 ln 3 + 5/8 ln 5 - 2 ln 2. JSD = 1/3 (3/4 ln 3 - ln 2) + 2/3 (3/8 ln 3 + 5/8 ln 5 - 2 ln 2)
    = 1/2 ln 3 + 5/12 ln 5 - 5/3 ln 2. (Were beta the student's weight, M would be (5/8, 3/8).)
    """
    loss, _ = jsd(logits((LN3, math.log(5.0)), (0.0, 0.0)), logits((LN3, 0.0), (0.0, 0.0)), ONE_LABEL,
                  beta=1 / 3)
    assert_close(loss, scalar(0.5 * LN3 + 5 / 12 * math.log(5.0) - 5 / 3 * LN2))


def test_jsd_at_beta_zero_is_the_forward_kl_and_at_one_the_reverse_kl():
    """Teacher (3/4, 1/4), student (1/2, 1/2), where the two KLs differ: beta 0 gives KL(teacher || student)
    = 3/4 ln 3 - ln 2 (forward_kl) and beta 1 gives KL(student || teacher) = ln 2 - 1/2 ln 3 (reverse_kl).

    They are the limits of the divergence scaled: JSD_beta / beta -> forward KL as beta -> 0 and
    JSD_beta / (1 - beta) -> reverse KL as beta -> 1 (off by O(beta): within 1% at beta = 1/1000).
    """
    student, teacher = logits((0.0, 0.0), (0.0, 0.0)), logits((LN3, 0.0), (0.0, 0.0))
    forward, reverse = scalar(0.75 * LN3 - LN2), scalar(LN2 - 0.5 * LN3)
    assert_close(jsd(student, teacher, ONE_LABEL, beta=0.0)[0], forward)
    assert_close(jsd(student, teacher, ONE_LABEL, beta=0.0)[0], forward_kl(student, teacher, ONE_LABEL)[0])
    assert_close(jsd(student, teacher, ONE_LABEL, beta=1.0)[0], reverse)
    assert_close(jsd(student, teacher, ONE_LABEL, beta=1.0)[0], reverse_kl(student, teacher, ONE_LABEL)[0])
    small = 1e-3
    assert_close(jsd(student, teacher, ONE_LABEL, beta=small)[0] / small, forward, rtol=1e-2, atol=0)
    assert_close(jsd(student, teacher, ONE_LABEL, beta=1 - small)[0] / small, reverse, rtol=1e-2, atol=0)


@pytest.mark.parametrize("objective, options", [
    (forward_kl, {}), (reverse_kl, {"temperature": 2.0}), (jsd, {"beta": 0.5}), (forward_kl, {"alpha": 0.5}),
])
def test_teacher_logits_get_no_gradient(objective, options):
    """The teacher is a fixed target: its logits are detached inside, even when they require gradients."""
    student = logits((0.0, 0.0), (0.0, 0.0), requires_grad=True)
    teacher = logits((LN3, 0.0), (0.0, 0.0), requires_grad=True)
    loss, _ = objective(student, teacher, ONE_LABEL, **options)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("objective, options, message", [
    (forward_kl, {"temperature": 0.0}, r"^'temperature' must be positive, got 0.0$"),
    (reverse_kl, {"alpha": 1.5}, r"^'alpha' must be in \[0, 1\], got 1.5$"),
    (jsd, {"beta": -0.1}, r"^'beta' must be in \[0, 1\], got -0.1$"),
    (jsd, {"alpha": -0.5}, r"^'alpha' must be in \[0, 1\], got -0.5$"),
])
def test_bad_options_raise_a_one_line_value_error_naming_the_option(objective, options, message):
    with pytest.raises(ValueError, match=message):
        objective(logits((0.0, 0.0), (0.0, 0.0)), logits((LN3, 0.0), (0.0, 0.0)), ONE_LABEL, **options)


def test_logits_over_different_vocabularies_are_refused():
    with pytest.raises(ValueError, match=r"student logits \(1, 2, 2\) and teacher logits \(1, 2, 3\) differ"):
        forward_kl(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), ONE_LABEL)


def test_the_three_are_found_by_name_as_the_distillation_family():
    """The engine finds them through the objectives registry, and no stage of another family takes them."""
    for name, fn in (("forward_kl", forward_kl), ("reverse_kl", reverse_kl), ("jsd", jsd)):
        objective = find_objective(name, DISTILLATION)
        assert objective.fn is fn and objective.family == "distillation"
        assert polm.components("objectives")[name] is fn
    assert {"forward_kl", "reverse_kl", "jsd"} <= set(objectives_of(DISTILLATION))
    with pytest.raises(PolmError, match="objective 'jsd' belongs to the distillation family, not to the "
                                        "language_modelling family"):
        find_objective("jsd", LANGUAGE_MODELLING)


def test_check_objective_options_accepts_their_options_and_rejects_a_bad_one():
    """Called once on the family's tiny inputs before training: good options pass, a bad value or an
    option the objective does not take is a PolmError naming the objective and the option."""
    check_objective_options(find_objective("forward_kl", DISTILLATION), {"temperature": 2.0, "alpha": 0.5})
    check_objective_options(find_objective("reverse_kl", DISTILLATION), {})
    check_objective_options(find_objective("jsd", DISTILLATION), {"beta": 0.0, "temperature": 0.5})
    with pytest.raises(PolmError, match=r"objective 'jsd': 'beta' must be in \[0, 1\], got 1.5"):
        check_objective_options(find_objective("jsd", DISTILLATION), {"beta": 1.5})
    with pytest.raises(PolmError, match=r"objective 'forward_kl': unknown option 'beta'.*Valid options: "
                                        r"temperature, alpha"):
        check_objective_options(find_objective("forward_kl", DISTILLATION), {"beta": 0.5})
