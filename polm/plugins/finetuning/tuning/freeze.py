"""Freeze tuning: train some modules of the model in full and leave the rest as they are."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polm.engine.errors import PolmError
from polm.engine.tuning import TuningMethod, unwrap_peft
from polm.plugins.finetuning.tuning.targets import module_overview, name_matches


@dataclass
class FreezeOptions:
    """Options of ``freeze``; the modules named by either option train, everything else is frozen."""

    trainable: list[str] = field(
        default_factory=list,
        metadata={"help": "modules or parameters to train: names or glob patterns, matched against the full name "
                          "or its last parts (e.g. 'lm_head', 'mlp', 'model.layers.*.self_attn')"},
    )
    last_layers: int = field(default=0, metadata={"help": "also train the last N transformer layers"})

    def __post_init__(self) -> None:
        if not all(isinstance(p, str) and p for p in self.trainable):
            raise ValueError(f"'trainable' must be a list of module names or patterns, got {self.trainable!r}")
        if self.last_layers < 0:
            raise ValueError(f"'last_layers' must not be negative, got {self.last_layers}")
        if not self.trainable and not self.last_layers:
            raise ValueError("set 'trainable' (module names) or 'last_layers' (a number); otherwise nothing trains")


class FreezeTuning(TuningMethod):
    """Train the named modules and / or the last layers; every other parameter keeps ``requires_grad=False``."""

    Options = FreezeOptions

    def prepare(self, model: torch.nn.Module, options: FreezeOptions) -> torch.nn.Module:
        model = unwrap_peft(model)
        patterns = list(options.trainable)
        if options.last_layers:
            name, layers = _layer_stack(model)
            if options.last_layers > len(layers):
                raise PolmError(
                    f"freeze: last_layers={options.last_layers} but {type(model).__name__} has {len(layers)} "
                    f"layers ({name})"
                )
            patterns += [f"{name}.{index}" for index in range(len(layers) - options.last_layers, len(layers))]
        model.requires_grad_(False)
        matched: set[str] = set()
        # Per module rather than model.named_parameters(), which lists a tied weight under one name only.
        for module_name, module in model.named_modules():
            for parameter_name, parameter in module.named_parameters(recurse=False):
                full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
                for pattern in patterns:
                    if any(name_matches(prefix, pattern) for prefix in _prefixes(full_name)):
                        parameter.requires_grad_(True)
                        matched.add(pattern)
        unmatched = [p for p in patterns if p not in matched]
        if unmatched:
            raise PolmError(
                f"freeze: {', '.join(repr(p) for p in unmatched)} match(es) no module of {type(model).__name__}; "
                f"its modules include: {module_overview(model)}"
            )
        return model


def _prefixes(name: str) -> list[str]:
    """``'a.b.c'`` -> ``['a', 'a.b', 'a.b.c']``: a parameter trains when it or a module above it matches."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _layer_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer's list of layers: the ModuleList as long as ``num_hidden_layers``, else the longest one."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise PolmError(f"freeze: {type(model).__name__} has no list of layers; name the modules with 'trainable'")
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [entry for entry in lists if len(entry[1]) == expected]
    return (exact or sorted(lists, key=lambda entry: -len(entry[1])))[0]
