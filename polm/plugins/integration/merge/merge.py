"""Merging models tensor by tensor: :func:`merge_models` behind ``polm merge`` and the ``merge`` stage.

Everything that can be wrong is found before the output is written: the config and its method
(:func:`~.config.check_merge_config`), the inputs (:func:`~.inputs.check_compatible`: one architecture, one
vocabulary, the same tensor names and shapes) and every tensor's parameters (:func:`plan_tensors`). Then each
tensor is read from every input, merged by the method, cast to the saved dtype and written, one tensor at a
time, into a folder that takes the output's name only once it is complete
(:func:`polm.engine.checkpoint.atomic_directory`). Tensors that are not floating point (integer buffers) are
not the method's to touch: they are copied from the base (the first model when there is no base).

A method that samples (a ``generator`` keyword) gets a generator seeded from the merge's seed and the tensor's
name, so a tensor's result depends on neither the order nor the other tensors.

LoRA adapters are merged through inputs that stand for their full models or their updates
(:func:`~.lora.prepare_lora_merge`, the ``lora`` key); a new adapter is written by :mod:`.lora`.

An input with parts (a polm multimodal model: ``language_model.``, ``connectors.``, ``encoders.`` tensors) has
its parts merged by the method and inputs of their ``parts`` entry (:func:`open_parts`), the others by the
config's; gradients run over each part's own layers. The output is written in the inputs' format
(:data:`~.writer.FOLDER_WRITERS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polm.engine.checkpoint import atomic_directory
from polm.engine.errors import PolmError
from polm.plugins.integration.merge.config import (
    PIPELINE_MODEL,
    MergeConfig,
    MergeMethod,
    check_merge_config,
    find_merge_method,
    merged_models,
    part_config,
    same_model,
)
from polm.plugins.integration.merge.inputs import MergeInput, check_compatible, model_input, open_input
from polm.plugins.integration.merge.lora import prepare_lora_merge
from polm.plugins.integration.merge.parameters import evaluate_setting, layer_count, layer_position
from polm.plugins.integration.merge.writer import (
    DEFAULT_SHARD_BYTES,
    FOLDER_WRITERS,
    merge_record,
    write_record,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeInputs:
    """The opened inputs of a merge.

    Attributes:
        base: the base model, or None.
        models: the models the method merges, in the order of their config entries.
        entries: those entries (their ``parameters``).
    """

    base: MergeInput | None
    models: list[MergeInput]
    entries: list[dict[str, Any]]

    @property
    def source(self) -> MergeInput:
        """The input whose config the output takes, and whose tensors are copied where the method does not merge."""
        return self.base if self.base is not None else self.models[0]

    def all(self) -> list[MergeInput]:
        return ([self.base] if self.base is not None else []) + self.models


@dataclass
class PartMerge:
    """How the tensors of one part a config's ``parts`` names are merged: the config of the part
    (:func:`~.config.part_config`), its method, and its inputs (the whole merge's, taken as that method takes a
    base and models)."""

    config: MergeConfig
    method: MergeMethod
    inputs: MergeInputs


@dataclass
class TensorPlan:
    """One output tensor: its name, shape and saved dtype, and the keywords of the method's call (None: copied);
    ``part``: the part of ``parts`` that merges it, or None for the config's own method."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    keywords: dict[str, Any] | None
    part: str | None = None

    @property
    def bytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


@dataclass
class MergeReport:
    """What :func:`merge_models` did: where it wrote, and the ``merge.json`` record."""

    output: Path
    method: str
    base: str | None
    models: list[str]
    tensors: int
    merged_tensors: int
    parameters: int
    dtype: str
    seconds: float
    record: dict[str, Any]

    def summary(self) -> str:
        """``ties of 2 models onto base: 21 tensors (19 merged), 0.1M parameters, bfloat16, 0.4 s``."""
        onto = f" onto {self.base}" if self.base is not None else ""
        return (f"{self.method} of {len(self.models)} model{'s' if len(self.models) != 1 else ''}{onto}: "
                f"{self.tensors} tensors ({self.merged_tensors} merged), {self.parameters / 1e6:.2f}M parameters, "
                f"{self.dtype}, {self.seconds:.1f} s")


def check_output_folder(output: Path) -> None:
    """Refuse an output that exists and is a file or a folder with something in it, so nothing is overwritten.

    Raises:
        PolmError: naming the folder.
    """
    if output.exists() and not output.is_dir():
        raise PolmError(f"output {output} is a file; give a folder that does not exist or is empty")
    if output.is_dir() and any(output.iterdir()):
        raise PolmError(f"output folder {output} is not empty; choose another --output (polm merge never writes "
                        "over a folder that holds something)")


def open_inputs(config: MergeConfig, method: MergeMethod, stack: ExitStack, relative_to: Path | None = None,
                pipeline_model: tuple[torch.nn.Module, Any] | None = None) -> MergeInputs:
    """Open the base and the models a config names (see :mod:`.inputs`); what they open is released with
    ``stack``. ``pipeline_model`` is ``(model, tokenizer)`` of a ``merge`` stage: the base unless the config
    names one, or the first model merged by a method that uses no base."""
    pipeline = model_input(*pipeline_model, PIPELINE_MODEL, stack) if pipeline_model is not None else None
    base = None
    if config.base_model is not None:
        base = open_input(str(config.base_model), stack, relative_to)
    elif pipeline is not None and method.base != "unused":
        base = pipeline
    entries = merged_models(config, method, relative_to, pipeline_base=pipeline is not None)
    models = [pipeline if entry["model"] == PIPELINE_MODEL else open_input(str(entry["model"]), stack, relative_to)
              for entry in entries]
    return MergeInputs(base, models, entries)


def open_parts(config: MergeConfig, inputs: MergeInputs, stack: ExitStack,
               relative_to: Path | None = None, pipeline_base: bool = False) -> dict[str, PartMerge]:
    """The merge of each part ``config.parts`` names, on the inputs :func:`open_inputs` opened (a model only the
    part's method merges, the base's own entry under ``models``, is opened now).

    Raises:
        PolmError: ``parts`` set for inputs without parts (transformers models).
    """
    if not config.parts:
        return {}
    source = inputs.source
    if not source.parts:
        raise PolmError(f"parts: '{source.reference}' is a {source.kind} model, which has no parts; 'parts' gives "
                        "the parts of polm multimodal models (language_model, connectors, encoders) their own method")
    opened = {item.reference: item for item in inputs.all()}
    merges = {}
    for part in config.parts:
        scoped = part_config(config, part)
        method = find_merge_method(scoped.merge_method)
        if method.base == "unused":
            base = None
        elif config.base_model is not None:
            base = inputs.base
        else:  # the pipeline's model, which open_inputs opened as the base or as the first model
            base = opened.get(PIPELINE_MODEL) if pipeline_base else None
        entries = merged_models(scoped, method, relative_to, pipeline_base)
        models = [opened.get(str(entry["model"])) or open_input(str(entry["model"]), stack, relative_to)
                  for entry in entries]
        merges[part] = PartMerge(scoped, method, MergeInputs(base, models, entries))
    return merges


def resolve_keywords(config: MergeConfig, method: MergeMethod, entries: list[dict[str, Any]], name: str,
                     t: float) -> dict[str, Any]:
    """The keywords of the method's call for tensor ``name`` at layer position ``t``: each per-model parameter as
    a list over ``entries`` (a model's own setting, else the top-level one, else the method's default), and the
    method's own parameters set in the config (the others keep the function's defaults).

    Raises:
        PolmError: an own parameter without a default for which no filter matches the tensor.
    """
    keywords: dict[str, Any] = {}
    for parameter, default in method.model_parameters.items():
        values = []
        for entry in entries:
            value = evaluate_setting((entry.get("parameters") or {}).get(parameter), name, t)
            if value is None:
                value = evaluate_setting(config.parameters.get(parameter), name, t)
            values.append(float(default if value is None else value))
        keywords[method.keyword(parameter)] = values
    for parameter, setting in config.parameters.items():
        if parameter in method.model_parameters:
            continue
        value = evaluate_setting(setting, name, t)
        keyword = method.keyword(parameter)
        if value is not None:
            keywords[keyword] = value
        elif keyword in method.parameters and method.parameters[keyword].default is method.parameters[keyword].empty:
            raise PolmError(f"parameters.{parameter}: no filter matches tensor {name} and merge method "
                            f"'{method.name}' has no default for it; end the list with a fallback {{value: ...}}")
    return keywords


def plan_tensors(config: MergeConfig, method: MergeMethod, inputs: MergeInputs,
                 parts: dict[str, PartMerge] | None = None) -> list[TensorPlan]:
    """Every output tensor, in the order of the source's tensors, with its saved dtype and its parameters (those
    of its part's merge where ``parts`` has one)."""
    source = inputs.source
    names = source.tensor_names()
    layers = {part: layer_count(name for name in names if source.part(name) == part)
              for part in {source.part(name) for name in names}}
    saved = DTYPES[config.saved_dtype] if config.saved_dtype else None
    plans = []
    for name in names:
        stored = source.dtype(name)
        part = source.part(name)
        if not stored.is_floating_point:
            plans.append(TensorPlan(name, source.shape(name), stored, None))
            continue
        merge = (parts or {}).get(part)
        by = merge or PartMerge(config, method, inputs)
        keywords = resolve_keywords(by.config, by.method, by.inputs.entries, name, layer_position(name, layers[part]))
        plans.append(TensorPlan(name, source.shape(name), saved or stored, keywords, part if merge else None))
    return plans


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from the merge's ``seed`` and the tensor's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def merge_tensor(method: MergeMethod, plan: TensorPlan, inputs: MergeInputs, seed: int) -> torch.Tensor:
    """The output tensor of ``plan``: the method applied to every model's tensor (and the base's, unless the
    method uses none), or the source's tensor where the plan copies it.

    Raises:
        PolmError: the method rejects its inputs (ValueError) or returns another shape, naming the tensor.
    """
    if plan.keywords is None:
        return inputs.source.tensor(plan.name)
    tensors = [model.tensor(plan.name) for model in inputs.models]
    base = inputs.base.tensor(plan.name) if inputs.base is not None and method.base != "unused" else None
    keywords = dict(plan.keywords)
    if method.takes_generator:
        keywords["generator"] = tensor_generator(seed, plan.name)
    try:
        merged = method.function(tensors, base, **keywords)
    except ValueError as error:
        raise PolmError(f"merge method '{method.name}' on tensor {plan.name}: {error}") from None
    if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != plan.shape:
        got = list(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
        raise PolmError(f"merge method '{method.name}' returned {got} for tensor {plan.name} of shape "
                        f"{list(plan.shape)}")
    return merged.to(plan.dtype)


def _tokenizer_source(config: MergeConfig, inputs: MergeInputs, relative_to: Path | None) -> MergeInput:
    if config.tokenizer_source in (None, "base"):
        return inputs.source
    for candidate in inputs.all():
        if same_model(config.tokenizer_source, candidate.reference, relative_to):
            return candidate
    return inputs.source  # the base's own entry, dropped from the models merged: the base itself


def given_config(config: MergeConfig) -> dict[str, Any]:
    """The config as the user gave it, for ``merge.json``: its keys, less those left unset."""
    return {key: value for key, value in dataclasses.asdict(config).items() if value not in (None, {}, [])}


def merge_models(config: MergeConfig, output: str | Path, *, relative_to: Path | None = None, seed: int = 0,
                 dtype: str | None = None, pipeline_model: tuple[torch.nn.Module, Any] | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, show_progress: bool = False) -> MergeReport:
    """Merge the models ``config`` names into a new folder ``output`` in their format (a transformers folder, or
    a polm multimodal model's), with ``merge.json`` and ``README.md``.

    Args:
        relative_to: the folder relative model paths are looked up in first (the config file's folder).
        seed: seeds the methods that sample.
        dtype: the saved dtype, over the config's (``float32``, ``float16``, ``bfloat16``).
        pipeline_model: ``(model, tokenizer)`` a ``merge`` stage starts from (see :func:`open_inputs`).
        max_shard_bytes: the size past which the weights are split into shards.
        show_progress: draw a progress bar.

    Returns:
        A :class:`MergeReport`.

    Raises:
        PolmError: before anything is written, for a bad config, an output folder that holds something, an input
            that cannot be read or does not match the others; while writing (which then leaves nothing), for a
            method that rejects a tensor.
    """
    started = time.perf_counter()
    given = given_config(config)
    if dtype is not None:
        if dtype not in DTYPES:
            raise PolmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        config = dataclasses.replace(config, dtype=dtype, out_dtype=None)
    method = check_merge_config(config, relative_to=relative_to, pipeline_base=pipeline_model is not None)
    output = Path(output)
    check_output_folder(output)
    with ExitStack() as stack:
        inputs = open_inputs(config, method, stack, relative_to, pipeline_model)
        lora = prepare_lora_merge(config, inputs.base, inputs.models, stack)  # None unless merging LoRA adapters
        if lora is not None:
            inputs = MergeInputs(lora.merged_base, lora.merged, inputs.entries)
        check_compatible(inputs.all())
        parts = open_parts(config, inputs, stack, relative_to, pipeline_base=pipeline_model is not None)
        opened_for_parts = [model for merge in parts.values() for model in merge.inputs.models
                            if all(model is not other for other in inputs.all())]
        if opened_for_parts:
            check_compatible([inputs.source, *opened_for_parts])
        plans = plan_tensors(config, method, inputs, parts)
        record = merge_record(given, method.name, inputs.base, inputs.models, seed,
                              config.saved_dtype, len(plans))
        if inputs.source.parts:
            record["parts"] = {part: (parts[part].method.name if part in parts else method.name)
                               for part in dict.fromkeys(inputs.source.part(plan.name) for plan in plans)}
        if lora is not None:
            record["lora"] = lora.record()
        by_name = {plan.name: plan for plan in plans}

        def produce(name: str) -> torch.Tensor:
            plan = by_name[name]
            if plan.part is None:
                return merge_tensor(method, plan, inputs, seed)
            return merge_tensor(parts[plan.part].method, plan, parts[plan.part].inputs, seed)

        with atomic_directory(output) as folder:
            if lora is not None and lora.writes_adapter:
                lora.write_adapter(folder, method, plans, produce, _tokenizer_source(config, inputs, relative_to))
            else:
                FOLDER_WRITERS[inputs.source.kind](
                    folder, inputs.source, _tokenizer_source(config, inputs, relative_to), config.saved_dtype,
                    [plan.name for plan in plans], [plan.bytes for plan in plans], produce, max_shard_bytes,
                    show_progress)
            write_record(folder, record, output.name)
        base = inputs.base.reference if inputs.base is not None else None
        models = [model.reference for model in inputs.models]
    parameters = sum(plan.bytes // plan.dtype.itemsize for plan in plans)
    return MergeReport(output, method.name, base, models, len(plans), sum(p.keywords is not None for p in plans),
                       parameters, config.saved_dtype or "dtypes as stored", time.perf_counter() - started, record)
