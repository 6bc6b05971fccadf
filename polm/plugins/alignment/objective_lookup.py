"""Finding a pairwise objective by name at run time, and checking its options before anything loads.

Shared by the stages that train with a registered objective (``dpo`` and its
presets, ``online_dpo``) and by ``kto``, which checks its own objective's options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from polm.engine.errors import PolmError, did_you_mean
from polm.engine.registry import Entry
from polm.plugins.alignment.objectives import PAIRWISE

PAIRWISE_ARGUMENTS = 4  # policy chosen, policy rejected, reference chosen, reference rejected


@dataclass
class Objective:
    """A registered pairwise objective and what its metadata says about its inputs."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    reference_free: bool = False
    average_logps: bool = False

    @classmethod
    def from_entry(cls, entry: Entry[Any]) -> Objective:
        meta = entry.metadata
        return cls(entry.name, entry.obj, bool(meta.get("reference_free", False)),
                   bool(meta.get("average_logps", False)))


def _takes_pairs(fn: Any) -> bool:
    """Whether ``fn`` can take the four log-prob tensors positionally (for objectives registered without a family)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= PAIRWISE_ARGUMENTS


def pairwise_objectives() -> dict[str, Entry[Any]]:
    """Registered objectives of the pairwise family: declared so, or undeclared with a fitting signature."""
    from polm.engine.plugins import registry

    found = {}
    for entry in registry("objectives").entries():
        family = entry.metadata.get("family")
        if family == PAIRWISE or (family is None and _takes_pairs(entry.obj)):
            found[entry.name] = entry
    return found


def find_objective(name: str) -> Objective:
    """The pairwise objective registered as ``name``.

    Raises:
        PolmError: no such objective, or one of another family (naming the pairwise ones that exist).
    """
    from polm.engine.plugins import registry

    objectives = pairwise_objectives()
    if name in objectives:
        return Objective.from_entry(objectives[name])
    available = ", ".join(sorted(objectives)) or "none"
    if name in registry("objectives"):
        family = registry("objectives").entry(name).metadata.get("family", "another")
        raise PolmError(f"objective '{name}' belongs to the {family} family, not to the pairwise preference "
                        f"objectives this stage trains with; choose one of: {available}")
    raise PolmError(f"unknown objective '{name}'.{did_you_mean(name, objectives)} Available: {available}")


def check_function_options(where: str, fn: Callable[..., Any], options: dict[str, Any], leading: int,
                           sample: tuple[Any, ...]) -> None:
    """Fail before training on options ``fn`` does not take or values it rejects.

    Args:
        where: what the options belong to, for messages (``"objective 'dpo'"``).
        leading: the positional tensor arguments before the options.
        sample: arguments to call ``fn`` with once, so that a value it refuses
            (``ValueError``) surfaces when the pipeline is built.

    Raises:
        PolmError: naming ``where``, the option and the valid ones.
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    if parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters):
        valid = [p.name for p in parameters[leading:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for name in options:
            if name not in valid:
                raise PolmError(f"{where}: unknown option '{name}'.{did_you_mean(name, valid)} "
                                f"Valid options: {', '.join(valid) or 'none'}")
    try:
        result = fn(*sample, **options)
    except (ValueError, TypeError) as error:
        raise PolmError(f"{where}: {error}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and torch.is_tensor(result[0])
            and isinstance(result[1], dict)):
        raise PolmError(f"{where} must return (loss tensor, metrics dict), got {type(result).__name__}")


def check_objective_options(objective: Objective, options: dict[str, Any]) -> None:
    """Fail before training on options the pairwise objective does not take or values it rejects.

    The objective is called once on (1,) zero tensors with ``options``.

    Raises:
        PolmError: naming the objective, the option and the valid ones.
    """
    zeros = torch.zeros(1)
    reference = (None, None) if objective.reference_free else (zeros, zeros)
    check_function_options(f"objective '{objective.name}'", objective.fn, options, PAIRWISE_ARGUMENTS,
                           (zeros, zeros, *reference))
