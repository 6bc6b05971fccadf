"""Stage options: declared as dataclasses, validated before anything trains."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from polm.engine.errors import PolmError, did_you_mean

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class StageOptions:
    """Options every training stage accepts. Stages subclass this to add their own.

    Each field's ``metadata["help"]`` is shown by ``polm plugins --json`` and in errors.
    """

    data: Any = field(default=None, metadata={"help": "training data: 'polm:<name>', a JSONL path, or a list of rows"})
    eval_data: Any = field(
        default=None,
        metadata={"help": "held-out data; defaults to the 'test' split when data is a bundled 'polm:<name>'"},
    )
    eval_size: int = field(default=200, metadata={"help": "held-out rows used by periodic and final evaluation (0: none)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 means run for 'epochs'"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data when max_steps is 0"})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay of weight matrices (biases and norm weights are not decayed)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps with linear warm-up"})
    lr_scheduler: str = field(default="cosine", metadata={"help": f"one of {', '.join(SCHEDULERS)}"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    max_length: int = field(default=512, metadata={"help": "tokens per example; longer ones are cut"})
    tuning: str = field(default="full", metadata={"help": "a registered tuning method (full, lora, ...)"})
    tuning_options: dict = field(default_factory=dict, metadata={"help": "options of the tuning method"})
    merge_adapters: bool = field(default=False, metadata={
        "help": "also save final/merged: the adapters merged into the base, a plain transformers model"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    log_every: int = field(default=10, metadata={"help": "append metrics to metrics.jsonl every N steps"})
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on a GPU that supports it, else fp32), no, fp16, bf16"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "generation length in evaluation"})

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_length", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "eval_size", "epochs", "lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"'{name}' must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"'lr_scheduler' must be one of {', '.join(SCHEDULERS)}, got '{self.lr_scheduler}'")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"'mixed_precision' must be one of {', '.join(MIXED_PRECISION)}, got '{self.mixed_precision}'"
            )
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("set 'max_steps' or 'epochs' above 0")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is Any:
        return "any"
    return getattr(origin or annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` where that is lossless, else raise TypeError."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    target = origin or annotation
    if target is type(None):
        if value is None:
            return None
        raise TypeError
    if target is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if isinstance(value, target):
        return value
    raise TypeError


def parse_options(owner: str, options_class: type, raw: dict[str, Any]) -> Any:
    """Build ``options_class`` from ``raw``, failing with one line on any problem.

    Args:
        owner: what the options belong to, for messages (``"stage 'sft'"``).

    Raises:
        PolmError: unknown option (with the closest valid name, or the field that
            lists it in ``metadata["aliases"]``), wrong type, or a value the
            options' ``__post_init__`` rejects.
    """
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    aliases = {alias: f.name for f in fields.values() for alias in f.metadata.get("aliases", ())}
    hints = typing.get_type_hints(options_class)
    values = {}
    for name, value in raw.items():
        if name not in fields:
            raise PolmError(
                f"{owner}: unknown option '{name}'."
                f"{f' Did you mean {aliases[name]!r}?' if name in aliases else did_you_mean(name, fields)} "
                f"Valid options: {', '.join(sorted(fields))}"
            )
        try:
            values[name] = _coerce(value, hints[name])
        except TypeError:
            raise PolmError(
                f"{owner}: option '{name}' must be {_type_name(hints[name])}, got {value!r}"
            ) from None
    try:
        return options_class(**values)
    except ValueError as error:
        raise PolmError(f"{owner}: {error}") from None
    except TypeError as error:  # a required option is missing
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise PolmError(f"{owner}: missing option(s) {', '.join(missing) or error}") from None


def describe_options(options_class: type) -> dict[str, dict[str, Any]]:
    """Each option's type, default and help, for ``polm plugins --json`` and docs."""
    hints = typing.get_type_hints(options_class)
    described = {}
    for f in dataclasses.fields(options_class):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        described[f.name] = {"type": _type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", "")}
    return described
