"""Stage options: declared as dataclasses, validated before anything trains.

A field's metadata says what the option means and which values it takes (see :class:`StageOptions`);
:func:`parse_options` enforces it, so an options class writes no range or choice check by hand.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from polm.engine.errors import PolmError, did_you_mean

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SCHEDULERS = ("cosine", "linear", "constant")
BOUNDS = ("min", "above", "max", "below")  # inclusive and exclusive lower bound, inclusive and exclusive upper
CONSTRAINTS = (*BOUNDS, "choices")


@dataclass
class StageOptions:
    """Options every training stage accepts. Stages subclass this, and the option groups of
    :mod:`polm.engine.option_groups` they share, to add their own.

    Each field's metadata describes the option, and :func:`parse_options` holds recipes to it:

    - ``help``: one line on what the option does (``describe_options`` lists it).
    - ``min`` / ``max``: inclusive bounds; ``"min": 1`` for a count, ``"min": 0`` for a value that must not
      be negative.
    - ``above`` / ``below``: exclusive bounds; ``"above": 0`` for a positive value, and with ``"max": 1``
      the interval (0, 1].
    - ``choices``: the values allowed, as a tuple.
    - ``aliases``: names a user may reach for instead (``rank`` for lora's ``r``); an unknown option that
      is one of them is answered with the option's real name.

    A field with no default is required. None passes every constraint (an optional option left unset). A
    field that a subclass declares again without constraints (to change its default or its help) keeps
    those of the field it overrides; one that sets any replaces them. Checks that involve several fields
    stay in ``__post_init__``.

    ``max_new_tokens`` is one length for every completion a stage generates: in evaluation, and in the
    rollouts or samples of the stages that sample (``grpo``, ``ppo``, ``online_dpo``, ``rft``).
    """

    eval_size: int = field(default=200, metadata={
        "help": "held-out rows used by periodic and final evaluation (0: none)", "min": 0})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 means run for 'epochs'", "min": 0})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data when max_steps is 0", "min": 0})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch per device", "min": 1})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "min": 1})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate", "min": 0})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay of weight matrices (biases and norm weights are not decayed)", "min": 0})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "fraction of steps with linear warm-up", "min": 0, "below": 1})
    lr_scheduler: str = field(default="cosine", metadata={
        "help": f"one of {', '.join(SCHEDULERS)}", "choices": SCHEDULERS})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)", "min": 0})
    nonfinite_loss: str = field(default="stop", metadata={
        "help": "a step whose loss is NaN or infinite: stop (the stage, naming the step and the newest "
                "checkpoint) or skip (no update; metrics.jsonl counts skipped_steps)", "choices": ("stop", "skip")})
    max_length: int = field(default=512, metadata={"help": "tokens per example; longer ones are cut", "min": 1})
    tuning: str = field(default="full", metadata={"help": "a registered tuning method (full, lora, ...)"})
    tuning_options: dict = field(default_factory=dict, metadata={"help": "options of the tuning method"})
    merge_adapters: bool = field(default=False, metadata={
        "help": "also save final/merged: the adapters merged into the base, a plain transformers model"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)", "min": 0})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)", "min": 0})
    keep_last: int = field(default=0, metadata={
        "help": "keep only the newest N checkpoints of the stage, deleting older ones as new ones are written "
                "(0: keep all)", "min": 0, "aliases": ("save_total_limit",)})
    log_every: int = field(default=10, metadata={"help": "append metrics to metrics.jsonl every N steps", "min": 1})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on a GPU that supports it, else fp32), no, fp16, bf16", "choices": MIXED_PRECISION})
    max_new_tokens: int = field(default=32, metadata={
        "help": "tokens generated per completion: in evaluation, and in the rollouts of stages that sample",
        "min": 1})

    def __post_init__(self) -> None:
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("set 'max_steps' or 'epochs' above 0")


def constraints(options_class: type, name: str) -> dict[str, Any]:
    """The constraints (``min``, ``choices``, ...) of option ``name``, from its most derived declaration
    that sets any (see :class:`StageOptions`)."""
    for cls in options_class.__mro__:
        declared = cls.__dict__.get("__dataclass_fields__", {}).get(name)
        if declared is not None and any(key in declared.metadata for key in CONSTRAINTS):
            return {key: declared.metadata[key] for key in CONSTRAINTS if key in declared.metadata}
    return {}


def check_constraints(name: str, value: Any, rules: Mapping[str, Any]) -> None:
    """Raise ValueError (one line naming ``name``) when ``value`` is not a choice or lies outside a bound.

    Messages: ``'x' must be one of a, b, got 'c'``; ``must be at least 1`` / ``must not be negative``
    (``min``), ``must be positive`` / ``must be above 2`` (``above``), ``must be at most`` (``max``),
    ``must be below`` (``below``), and for two bounds the interval: ``must be in (0, 1], got 1.5``.
    """
    if value is None:
        return
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"'{name}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    low_in, low_out, high_in, high_out = (rules.get(key) for key in BOUNDS)
    if ((low_in is None or value >= low_in) and (low_out is None or value > low_out)
            and (high_in is None or value <= high_in) and (high_out is None or value < high_out)):
        return
    low = f"[{low_in}" if low_in is not None else f"({low_out}" if low_out is not None else None
    high = f"{high_in}]" if high_in is not None else f"{high_out})" if high_out is not None else None
    if low is not None and high is not None:
        wanted = f"be in {low}, {high}"
    elif low_in is not None:
        wanted = "not be negative" if low_in == 0 else f"be at least {low_in}"
    elif low_out is not None:
        wanted = "be positive" if low_out == 0 else f"be above {low_out}"
    else:
        wanted = f"be at most {high_in}" if high_in is not None else f"be below {high_out}"
    raise ValueError(f"'{name}' must {wanted}, got {value}")


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
            lists it in ``metadata["aliases"]``), wrong type, a value outside the field's
            constraints (see :class:`StageOptions`), a required option missing, or a
            value the options' ``__post_init__`` rejects.
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
        if isinstance(values[name], float) and not math.isfinite(values[name]):
            raise PolmError(f"{owner}: option '{name}' must be a finite number, got {values[name]}")
        try:
            check_constraints(name, values[name], constraints(options_class, name))
        except ValueError as error:
            raise PolmError(f"{owner}: {error}") from None
    missing = [f for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PolmError(f"{owner}: " + "; ".join(f"option '{f.name}' is required ({f.metadata.get('help', '')})"
                                                 for f in missing))
    try:
        return options_class(**values)
    except ValueError as error:
        raise PolmError(f"{owner}: {error}") from None


def describe_options(options_class: type) -> dict[str, dict[str, Any]]:
    """Each option's type, default, help and constraints, for ``polm plugins --json`` and docs."""
    hints = typing.get_type_hints(options_class)
    described = {}
    for f in dataclasses.fields(options_class):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        described[f.name] = {"type": _type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", ""),
                             **constraints(options_class, f.name)}
    return described
