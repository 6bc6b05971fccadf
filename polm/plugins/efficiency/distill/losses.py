"""Distillation losses: the student's next-token distributions pulled towards the teacher's.

Each is an objective of the distillation family (:mod:`polm.engine.objectives`)::

    fn(student_logits, teacher_logits, labels, **options) -> (loss, metrics)

with (B, T, V) logits of the student and of the teacher over one vocabulary and (B, T) labels, ``-100``
where no loss is taken; position ``t`` predicts ``labels[t + 1]``, so the divergence is taken between
``softmax(logits[:, t] / temperature)`` of the two models wherever ``labels[:, t + 1]`` is labelled, and
averaged over those tokens. No gradient flows into the teacher's logits.

The options all three share:

- ``temperature`` (> 0, default 1): divides both models' logits; the divergence is multiplied by
  ``temperature ** 2`` so that its gradients keep their scale as the temperature changes (Hinton et al.).
- ``alpha`` (in [0, 1], default 0: pure distillation): the weight of the student's hard-label
  cross-entropy (at temperature 1, :func:`polm.engine.lm.completion_loss`), as
  ``alpha * hard + (1 - alpha) * temperature ** 2 * divergence``.

Metrics: ``distill_loss`` (the divergence times ``temperature ** 2``, as it enters the loss),
``hard_loss`` (always reported; computed without gradient when ``alpha`` is 0), and the completion
loss's ``token_accuracy`` and ``label_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from polm.engine.encoding import IGNORE_INDEX
from polm.engine.lm import completion_loss
from polm.engine.options import check_constraints

#: ``(student, teacher)`` tempered (N, V) log-probs -> (N,) divergence per labelled token.
Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` of each row: (N, V) log-probs -> (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0, alpha: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Knowledge distillation: ``KL(teacher || student)`` per labelled token, the student covering every
    token the teacher gives mass to (mean-seeking).

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531:
    soft targets at a temperature, the soft loss scaled by ``temperature ** 2``, mixed with the hard labels.

    Args:
        student_logits: (B, T, V) the student's outputs (with gradients).
        teacher_logits: (B, T, V) the teacher's outputs (detached here).
        labels: (B, T) target ids, ``-100`` where no loss is taken.
        temperature: divides both models' logits, > 0.
        alpha: weight of the student's hard-label cross-entropy, in [0, 1].

    Returns:
        The loss averaged over labelled tokens (scalar) and the metrics of the module docstring.

    Raises:
        ValueError: a bad option, logits of different shapes, or no labelled token.
    """
    return _distillation_loss(lambda student, teacher: kl_divergence(teacher, student),
                              student_logits, teacher_logits, labels, temperature, alpha)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0, alpha: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``KL(student || teacher)`` per labelled token: the student keeps to the teacher's likeliest tokens
    (mode-seeking), as in MiniLLM (Gu et al. 2024, https://arxiv.org/abs/2306.08543) and GKD.

    Args and Returns as :func:`forward_kl`, with the same ``temperature ** 2`` and ``alpha``.

    Raises:
        ValueError: a bad option, logits of different shapes, or no labelled token.
    """
    return _distillation_loss(kl_divergence, student_logits, teacher_logits, labels, temperature, alpha)


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.5,
        temperature: float = 1.0, alpha: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The generalised Jensen-Shannon divergence of GKD per labelled token.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes", https://arxiv.org/abs/2306.13649, eq. (1): with ``M = beta p_teacher + (1 - beta) p_student``,
    ``JSD_beta = beta KL(p_teacher || M) + (1 - beta) KL(p_student || M)``; ``beta = 0.5`` is the
    symmetric JSD. The divergence itself vanishes at both ends (``M`` becomes one of the two), but
    ``JSD_beta / beta -> KL(p_teacher || p_student)`` as ``beta -> 0`` and ``JSD_beta / (1 - beta) ->
    KL(p_student || p_teacher)`` as ``beta -> 1``; as in GKD (and TRL's ``generalized_jsd_loss``), the ends
    are those limits: ``beta = 0`` is :func:`forward_kl` and ``beta = 1`` is :func:`reverse_kl`.
    Gradients flow into the student through both of its terms, ``M`` included.

    Args:
        student_logits, teacher_logits, labels, temperature, alpha: as :func:`forward_kl` (GKD itself does
            not scale by ``temperature ** 2``; here every distillation loss does, so they compare).
        beta: the teacher's weight in the mixture ``M``, in [0, 1].

    Returns:
        The loss averaged over labelled tokens (scalar) and the metrics of the module docstring.

    Raises:
        ValueError: a bad option, logits of different shapes, or no labelled token.
    """
    check_constraints("beta", beta, {"min": 0, "max": 1})

    def divergence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if beta == 0:
            return kl_divergence(teacher, student)
        if beta == 1:
            return kl_divergence(student, teacher)
        mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))  # (N, V) log M
        return beta * kl_divergence(teacher, mixture) + (1 - beta) * kl_divergence(student, mixture)

    return _distillation_loss(divergence, student_logits, teacher_logits, labels, temperature, alpha)


def _distillation_loss(divergence: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       labels: torch.Tensor, temperature: float,
                       alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``alpha * hard + (1 - alpha) * temperature ** 2 * mean(divergence)`` over the labelled tokens."""
    check_constraints("temperature", temperature, {"above": 0})
    check_constraints("alpha", alpha, {"min": 0, "max": 1})
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; distillation needs one vocabulary")
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0):  # a metric only when alpha is 0
        hard, lm_metrics = completion_loss(student_logits, labels)  # raises on a batch with no labelled token
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    student = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)  # (N, V)
    teacher = F.log_softmax(teacher_logits.detach()[:, :-1][mask].float() / temperature, dim=-1)  # (N, V)
    soft = divergence(student, teacher).mean() * temperature ** 2
    loss = soft if alpha == 0 else alpha * hard + (1 - alpha) * soft
    return loss, {"distill_loss": float(soft.detach()), "hard_loss": float(hard.detach()), **lm_metrics}
