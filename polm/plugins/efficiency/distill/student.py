"""The student of a distillation: the teacher's architecture made smaller, started from the teacher's weights.

As DistilBERT (Sanh et al. 2019, https://arxiv.org/abs/1910.01108) takes every other layer of BERT, the
student here is the teacher's config with a recipe's overrides (``{num_hidden_layers: 2,
intermediate_size: 512}``) and, with ``student_init: teacher``, starts from a subset of the teacher's
layers spread evenly over its depth (the first and the last kept). A tensor the student shrank along some
dimension (fewer MLP neurons, a narrower hidden size) takes the leading slice of the teacher's, which for
the MLP keeps the same first neurons in its gate, up and down projections; a tensor larger than the
teacher's starts from the student's own random initialisation.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch

from polm.engine.errors import PolmError, did_you_mean

#: The first ``.N.`` of a parameter name: the layer index in transformers' decoder models
#: (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.3.attn.c_attn.weight``).
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class StudentInit:
    """How the student's tensors started: copied whole, as a leading slice, or left at random init."""

    copied: int
    sliced: int
    random: int


def student_config(teacher_config: Any, overrides: dict[str, Any]) -> Any:
    """The teacher's config with ``overrides`` applied.

    Raises:
        PolmError: an override that is not a field of the teacher's config, naming the closest one.
    """
    config = copy.deepcopy(teacher_config)
    known = sorted(config.to_dict())
    for key, value in overrides.items():
        if key not in known:
            raise PolmError(f"option 'student': '{key}' is not a field of the teacher's {type(config).__name__}."
                            f"{did_you_mean(key, known)}")
        setattr(config, key, value)
    return config


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer starts from: evenly spaced, first and last kept.

    >>> layer_map(4, 2), layer_map(6, 3), layer_map(4, 4)
    ([0, 3], [0, 2, 5], [0, 1, 2, 3])
    """
    if student_layers == 1:
        return [0]
    return [round(index * (teacher_layers - 1) / (student_layers - 1)) for index in range(student_layers)]


def initialise_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> StudentInit:
    """Copy into ``student`` what fits of ``teacher``'s weights (layers by :func:`layer_map`); in place.

    Returns:
        How many tensors were copied, sliced, or left as initialised.
    """
    layers = layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    source = teacher.state_dict()
    copied = sliced = random = 0
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            match = _LAYER_INDEX.search(name)
            teacher_name = (name[:match.start()] + f".{layers[int(match.group(1))]}." + name[match.end():]
                            if match else name)
            original = source.get(teacher_name)
            if original is None or original.dim() != tensor.dim() or any(
                    s > t for s, t in zip(tensor.shape, original.shape)):
                random += 1
                continue
            tensor.copy_(original[tuple(slice(0, size) for size in tensor.shape)])
            copied, sliced = (copied + 1, sliced) if tensor.shape == original.shape else (copied, sliced + 1)
    return StudentInit(copied, sliced, random)


def build_student(teacher: torch.nn.Module, overrides: dict[str, Any], init: str) -> tuple[torch.nn.Module, StudentInit]:
    """A causal LM of the teacher's architecture with ``overrides``, on the teacher's device and dtype.

    Args:
        teacher: a transformers causal LM (adapters merged).
        overrides: config fields to change, e.g. ``{"num_hidden_layers": 2}``.
        init: ``teacher`` (:func:`initialise_from_teacher`) or ``random``.

    Raises:
        PolmError: an override that is not a config field, or a config transformers cannot build.
    """
    from transformers import AutoModelForCausalLM

    config = student_config(teacher.config, overrides)
    try:
        student = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError) as error:
        raise PolmError(f"option 'student': transformers cannot build the student from {overrides}: "
                        f"{str(error).splitlines()[0]}") from None
    parameter = next(teacher.parameters())
    student.to(device=parameter.device, dtype=parameter.dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    started = (initialise_from_teacher(student, teacher) if init == "teacher"
               else StudentInit(0, 0, len(student.state_dict())))
    return student, started
