"""Training objectives by family: the signature each family shares, and finding one by name for a stage.

An objective is a pure function returning ``(loss, metrics)``: a scalar tensor and a dict of floats. A
plugin registers it with its family, ``register(name, fn, family=PAIRWISE)``, and a stage trains with
the objectives of one family, chosen by its ``objective`` option and configured by ``objective_options``
(keyword arguments with defaults; an objective rejects a bad value with ``ValueError``):

- ``language_modelling``: ``fn(logits, labels, **options)`` with (B, T, V) logits and (B, T) labels,
  ``-100`` where no loss is taken, returning a mean over the labelled tokens (the training loop weighs
  micro-batches by those tokens); the loss of ``sft``, ``align`` and ``rft`` (default ``completion``,
  :func:`polm.engine.lm.completion_loss`).
- ``pairwise``: ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
  **options)``, each a (B,) tensor of completion log-probs; ``dpo`` (default ``dpo``), ``simpo``, ``orpo``
  and ``online_dpo``.
- ``unpaired``: ``fn(policy_logps, ref_logps, labels, reference_point, **options)`` with (B,) log-probs,
  (B,) bool labels (True: desirable) and a scalar reference point; ``kto`` (default ``kto``).
- ``policy_gradient``: ``fn(logps, old_logps, advantages, mask, *, ref_logps, beta, epsilon_low,
  epsilon_high, max_completion_length, **options)`` with (N, C) log-probs of the sampled completion
  tokens under the policy and under the sampling policy, (N,) or (N, C) advantages and the (N, C)
  completion mask; the stage passes the keyword context (the reference's log-probs or None, its KL
  weight, the clip range and the generation budget: an objective takes ``**context`` for what it does not
  use), and ``objective_options`` on top. The loss of ``grpo`` (default ``grpo``) and ``ppo`` (default
  ``dapo``); the built-in ``grpo``, ``dr_grpo`` and ``dapo`` are the clipped surrogate
  (:func:`polm.engine.rl.losses.clipped_policy_loss`) under each paper's reduction.
- ``distillation``: ``fn(student_logits, teacher_logits, labels, **options)`` with (B, T, V) logits of the
  student (with gradients) and of the teacher (none flows into them) and (B, T) labels, ``-100`` where no
  loss is taken; like ``language_modelling``, position ``t`` predicts ``labels[t + 1]``, and the loss is a
  mean over the labelled tokens; ``forward_kl``, ``reverse_kl`` and ``jsd`` (the efficiency paradigm).

A pairwise objective may also declare ``reference_free=True`` (it takes None for the reference log-probs
and no reference model is held) and ``average_logps=True`` (log-probs averaged over the completion's
tokens rather than summed). A policy-gradient objective declares ``token_level=True`` when its loss is a
mean over every completion token rather than over completions: its stage then weighs each completion by
its tokens in the rollout buffer, so that the training loop normalises an update over every token of the
accumulation window (:mod:`polm.engine.rl.on_policy`). An objective registered without a family belongs to
none and no stage uses it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from polm.engine.encoding import IGNORE_INDEX
from polm.engine.errors import PolmError, did_you_mean
from polm.engine.registry import Entry

LANGUAGE_MODELLING = "language_modelling"
PAIRWISE = "pairwise"
UNPAIRED = "unpaired"
POLICY_GRADIENT = "policy_gradient"
DISTILLATION = "distillation"
#: Each family and the number of tensors its objectives take positionally before their options.
FAMILIES = {LANGUAGE_MODELLING: 2, PAIRWISE: 4, UNPAIRED: 4, POLICY_GRADIENT: 4, DISTILLATION: 3}
#: The keyword context a stage passes every policy-gradient objective (values for the check before training).
POLICY_CONTEXT = {"ref_logps": None, "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2,
                  "max_completion_length": 1}


class LanguageModellingObjective(Protocol):
    """Next-token loss on labelled tokens: ``labels[t + 1]`` predicted from ``logits[t]``."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 **options: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


class PairwiseObjective(Protocol):
    """A preference loss on (B,) log-probs of chosen and rejected completions, under the policy and the reference."""

    def __call__(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                 **options: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


class UnpairedObjective(Protocol):
    """A loss on (B,) log-probs of completions labelled desirable (True) or not, against a reference point."""

    def __call__(self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
                 reference_point: torch.Tensor | float, **options: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


class PolicyGradientObjective(Protocol):
    """A policy loss on sampled completions: (N, C) log-probs under the policy (with gradients) and under the
    sampling policy, advantages (N,) or (N, C), the (N, C) completion mask, and the stage's keyword context."""

    def __call__(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 *, ref_logps: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float,
                 max_completion_length: int, **options: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


class DistillationObjective(Protocol):
    """A loss matching the student's next-token distributions to the teacher's on labelled tokens: (B, T, V)
    student and teacher logits, (B, T) labels, ``labels[t + 1]`` predicted from ``logits[t]``."""

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 **options: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class Objective:
    """A registered objective and what its metadata says about its inputs."""

    name: str
    fn: (LanguageModellingObjective | PairwiseObjective | UnpairedObjective | PolicyGradientObjective
         | DistillationObjective)
    family: str
    reference_free: bool = False
    average_logps: bool = False
    token_level: bool = False

    @classmethod
    def from_entry(cls, entry: Entry[Any]) -> Objective:
        meta = entry.metadata
        return cls(entry.name, entry.obj, meta["family"], bool(meta.get("reference_free", False)),
                   bool(meta.get("average_logps", False)), bool(meta.get("token_level", False)))


def objectives_of(family: str) -> list[str]:
    """The names of the registered objectives of ``family``, sorted."""
    from polm.engine.plugins import registry

    return sorted(entry.name for entry in registry("objectives").entries() if entry.metadata.get("family") == family)


def find_objective(name: str, family: str) -> Objective:
    """The objective registered as ``name``, which must belong to ``family``.

    Raises:
        PolmError: no such objective, one of another family or of none (naming its family and the
            stage's, and listing the objectives of ``family``).
    """
    from polm.engine.plugins import registry

    available = objectives_of(family)
    listed = ", ".join(available) or "none"
    if name not in registry("objectives"):
        raise PolmError(f"unknown objective '{name}'.{did_you_mean(name, available)} Available: {listed}")
    entry = registry("objectives").entry(name)
    declared = entry.metadata.get("family")
    if declared is None:
        raise PolmError(f"objective '{name}' (plugin '{entry.plugin}') declares no family; it must be registered "
                        f"with family= one of {', '.join(FAMILIES)}. This stage takes a {family} objective: {listed}")
    if declared != family:
        raise PolmError(f"objective '{name}' belongs to the {declared} family, not to the {family} family this "
                        f"stage trains with; choose one of: {listed}")
    return Objective.from_entry(entry)


def _check_function_options(where: str, fn: Callable[..., Any], options: dict[str, Any], leading: int,
                           sample: tuple[Any, ...], context: dict[str, Any] | None = None) -> None:
    """Fail before training on options ``fn`` does not take or values it rejects.

    Args:
        where: what the options belong to, for messages (``"objective 'dpo'"``).
        leading: the positional tensor arguments before the options.
        sample: arguments to call ``fn`` with once, so that a value it refuses
            (``ValueError``) surfaces when the pipeline is built.
        context: keyword arguments the stage itself passes (not options a user may set).

    Raises:
        PolmError: naming ``where``, the option and the valid ones.
    """
    context = context or {}
    for name in options:
        if name in context:
            raise PolmError(f"{where}: '{name}' is set by the stage (its own option of that meaning), not by "
                            f"objective_options")
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    if parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters):
        valid = [p.name for p in parameters[leading:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and p.name not in context]
        for name in options:
            if name not in valid:
                raise PolmError(f"{where}: unknown option '{name}'.{did_you_mean(name, valid)} "
                                f"Valid options: {', '.join(valid) or 'none'}")
    try:
        result = fn(*sample, **context, **options)
    except (ValueError, TypeError) as error:
        raise PolmError(f"{where}: {error}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and torch.is_tensor(result[0])
            and isinstance(result[1], dict)):
        raise PolmError(f"{where} must return (loss tensor, metrics dict), got {type(result).__name__}")


def _sample_arguments(objective: Objective) -> tuple[Any, ...]:
    """Tiny inputs of the objective's family: (1,) zero log-probs, one labelled token of a 2-word vocabulary
    (under one model, or under a student and a teacher that disagree), or one sampled token."""
    zeros = torch.zeros(1)
    if objective.family == POLICY_GRADIENT:
        return torch.zeros(1, 1), torch.zeros(1, 1), zeros, torch.ones(1, 1)  # (N, C), (N, C), (N,), (N, C)
    if objective.family == LANGUAGE_MODELLING:
        return torch.zeros(1, 2, 2), torch.tensor([[IGNORE_INDEX, 1]])  # (B, T, V), (B, T)
    if objective.family == DISTILLATION:
        teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # (B, T, V), unlike the student's
        return torch.zeros(1, 2, 2), teacher, torch.tensor([[IGNORE_INDEX, 1]])  # (B, T)
    if objective.family == UNPAIRED:
        return zeros, zeros, torch.ones(1, dtype=torch.bool), 0.0
    reference = (None, None) if objective.reference_free else (zeros, zeros)
    return zeros, zeros, *reference


def check_objective_options(objective: Objective, options: dict[str, Any]) -> None:
    """Fail before training on options the objective does not take or values it rejects.

    The objective is called once, with ``options``, on tiny inputs of its family.

    Raises:
        PolmError: naming the objective, the option and the valid ones.
    """
    context = POLICY_CONTEXT if objective.family == POLICY_GRADIENT else None
    _check_function_options(f"objective '{objective.name}'", objective.fn, options, FAMILIES[objective.family],
                           _sample_arguments(objective), context)
