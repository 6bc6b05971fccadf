"""What every peft-backed tuning method does: merge earlier adapters, wrap, report errors in one line."""

from __future__ import annotations

from typing import Any

import torch

from polm.engine.errors import PolmError
from polm.engine.tuning import TuningMethod, unwrap_peft


class PeftTuning(TuningMethod):
    """A tuning method that wraps the model with a peft adapter.

    Subclasses set ``name`` and ``Options`` and build the peft config in
    :meth:`peft_config`; :meth:`prepare` merges any adapter an earlier stage left
    (so stages chain), wraps the model with ``peft.get_peft_model`` and returns
    the ``PeftModel``, whose adapter parameters alone are trainable.
    """

    name = "peft"

    def peft_config(self, model: torch.nn.Module, options: Any) -> Any:
        """The ``peft.PeftConfig`` for ``model``; raise :class:`PolmError` on targets it lacks."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, options: Any) -> torch.nn.Module:
        from peft import get_peft_model

        model = unwrap_peft(model)
        config = self.peft_config(model, options)
        try:
            return get_peft_model(model, config)
        except ValueError as error:  # peft's own checks (unsupported layer types, bad combinations)
            raise PolmError(f"{self.name}: {str(error).splitlines()[0]}") from None


def check_target_option(value: Any, option: str) -> None:
    """``target_modules``-like options are a list of names or one regular expression."""
    if isinstance(value, list) and (not value or not all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"'{option}' must be a non-empty list of module names or a regular expression, got {value!r}")
    if isinstance(value, str) and not value:
        raise ValueError(f"'{option}' must not be empty")


def check_fraction(value: float, option: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"'{option}' must be in [0, 1), got {value}")


def check_positive(value: float, option: str) -> None:
    if value <= 0:
        raise ValueError(f"'{option}' must be positive, got {value}")
