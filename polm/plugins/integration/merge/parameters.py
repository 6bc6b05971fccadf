"""Merge parameters per tensor: mergekit's scalars, gradients over the layers and per-tensor-name filters.

A parameter's setting in a merge config is one of::

    weight: 0.5                                        # a scalar, for every tensor
    density: [0.2, 0.5, 0.8]                           # a gradient, interpolated over the layers
    weight: [{filter: self_attn, value: 0.3}, {value: [0.5, 0.7]}]   # the first filter that matches wins

A filter matches a tensor whose name contains it (no filter, or ``*``, matches every tensor), and its value is a
scalar or a gradient. A gradient is read at ``t``, the tensor's place among the layers: ``i / (n - 1)`` for a
tensor of layer ``i`` (``model.layers.12.``) of ``n`` layers, 1 when there is a single layer, and 0 for a
tensor outside the layers (embeddings, final norm, output layer), as mergekit reads them. A setting in which
no filter matches leaves the parameter to its next source: a model's own ``parameters``, then the config's
top-level ``parameters``, then the method's default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

#: The layer index in a tensor name: ``model.layers.12.mlp...`` (Llama, Qwen, Mistral, ...), ``transformer.h.3.``
#: (GPT-2), ``blocks.0.``.
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
CONDITION_KEYS = ("filter", "value")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.12.mlp.up_proj.weight`` -> 12), or None outside the layers."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_count(names: Iterable[str]) -> int:
    """How many layers tensors with these names span: the highest layer index plus one (0 without layers)."""
    indices = [index for index in map(layer_index, names) if index is not None]
    return max(indices) + 1 if indices else 0


def layer_position(name: str, layers: int) -> float:
    """``t`` of the tensor ``name`` in a model of ``layers`` layers (see the module docstring)."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (layers - 1) if layers > 1 else 1.0


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of a setting checked by :func:`check_setting` for one tensor, or None when no filter matches.

    A gradient ``[v0, ..., vk]`` is interpolated linearly at ``t * k``: with ``[0.2, 0.5, 0.8]``, ``t = 0.25``
    gives ``0.35``.
    """
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for condition in setting:
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in tensor_name:
                return evaluate_setting(condition["value"], tensor_name, t)
        return None
    if isinstance(setting, list):
        scaled = t * (len(setting) - 1)
        low = min(int(scaled), len(setting) - 1)
        high = min(low + 1, len(setting) - 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    return setting


def check_setting(setting: Any, where: str, numeric: bool) -> None:
    """Raise ValueError (one line starting with ``where``) unless ``setting`` is a scalar, a gradient or a list of
    ``{filter, value}`` conditions. With ``numeric`` a scalar must be a finite number (a per-model parameter);
    otherwise it may also be a boolean or a string (a method's own option, such as ``normalize: true``)."""
    if isinstance(setting, list) and setting and all(isinstance(item, dict) for item in setting):
        for index, condition in enumerate(setting):
            unknown = [key for key in condition if key not in CONDITION_KEYS]
            if unknown:
                raise ValueError(f"{where}[{index}]: unknown key '{unknown[0]}' in a filter; a filter is "
                                 "{filter: <part of a tensor name>, value: <number or gradient>}")
            if "value" not in condition:
                raise ValueError(f"{where}[{index}]: a filter needs a 'value'")
            pattern = condition.get("filter")
            if pattern is not None and not isinstance(pattern, str):
                raise ValueError(f"{where}[{index}]: 'filter' must be text (part of a tensor name), got {pattern!r}")
            if isinstance(condition["value"], (list, dict)) and not _is_gradient(condition["value"]):
                raise ValueError(f"{where}[{index}]: 'value' must be a number or a list of numbers (a gradient), "
                                 f"got {condition['value']!r}")
            check_setting(condition["value"], f"{where}[{index}].value", numeric)
        return
    if isinstance(setting, list):
        if not _is_gradient(setting):
            raise ValueError(f"{where}: a list is a gradient of numbers ([0.2, 0.5]) or a list of filters "
                             f"([{{filter: mlp, value: 0.5}}, {{value: 0.3}}]), got {setting!r}")
        for value in setting:
            _check_scalar(value, where, numeric=True)
        return
    _check_scalar(setting, where, numeric)


def _is_gradient(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value))


def _check_scalar(value: Any, where: str, numeric: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value}")
    if numeric and not number:
        raise ValueError(f"{where}: must be a number, a gradient or a list of filters, got {value!r}")
    if not numeric and not (number or isinstance(value, (bool, str))):
        raise ValueError(f"{where}: must be a number, a boolean, a string, a gradient or a list of filters, "
                         f"got {value!r}")
