"""Merge configs: mergekit's YAML, read and checked before any model is loaded or anything written.

Example (a mergekit user's file works as it is)::

    merge_method: ties
    base_model: runs/base/00-sft
    models:
      - model: runs/math/00-sft
        parameters: {weight: 0.5, density: [0.2, 0.5, 0.8]}
      - model: runs/code/00-sft
        parameters:
          weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]
          density: 0.5
    parameters: {normalize: true}
    dtype: bfloat16

``merge_method`` names a method of the ``merge_methods`` registry. Each model's ``parameters`` set the method's
per-model parameters (its ``model_parameters`` metadata, e.g. ``weight``, ``density``); the top-level
``parameters`` set the method's own parameters (the keyword parameters of its function, ``normalize``,
``lambda``, ``t``, ...) and defaults of the per-model ones. Any of them may be a scalar, a gradient over the
layers or a list of per-tensor-name filters (:mod:`.parameters`). A model listed under ``models`` that is also
the ``base_model`` of a method whose base is required is the base, not one of the models merged onto it (as
in mergekit). ``dtype`` (and mergekit's ``out_dtype``, which wins) is the dtype the merged tensors are saved
in; without either each keeps its dtype in the base model (the first model when there is no base). The
methods compute in at least float32 whatever the dtype. ``tokenizer_source`` may be ``base`` or one of the
inputs: the models must share one vocabulary anyway, so it only chooses whose tokenizer files are written.

LoRA adapters (peft adapter folders: ``adapter_config.json`` and ``adapter_model.safetensors``, such as a polm
LoRA stage's ``final/``) merge like models, on the base they share (``base_model``, else their
``base_model_name_or_path``), as the polm key ``lora`` says (mergekit has none; see :class:`LoraMerge`)::

    lora: {output: adapter, combine: svd, rank: 16}

polm multimodal models (a folder with ``multimodal.json``) merge part by part: the language model, the
connectors and the encoders (:mod:`.multimodal`). ``merge_method`` and ``parameters`` merge every part but
those the polm key ``parts`` gives a method of their own::

    merge_method: ties            # the language model and the encoders
    parameters: {density: 0.5}
    parts:
      connectors: {merge_method: linear, parameters: {normalize: true}}

A part is ``language_model``, ``connectors`` or ``encoders``; it is merged as if its ``merge_method`` and
``parameters`` were the config's (the top-level ``parameters`` do not reach it), with the same ``base_model``
and models, each model's ``parameters`` applying where the part's method takes them (per part, through a
filter: ``weight: [{filter: connectors., value: 0.5}, {value: 0.3}]``).

Refused, with the line that holds them: mergekit's layer ``slices`` (and ``layer_range``), ``modules``, the
``tokenizer`` section, ``tokenizer_source: union``, and ``chat_template``; keys that neither tool knows get the
closest valid key.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polm.engine.errors import PolmError, did_you_mean
from polm.engine.options import parse_options
from polm.plugins.integration.merge.inputs import (
    ADAPTER_CONFIG_FILE,
    CONFIG_FILE,
    local_path,
    looks_like_path,
)
from polm.plugins.integration.merge.parameters import check_setting

DTYPES = ("float32", "float16", "bfloat16")
BASE_POLICIES = ("required", "optional", "unused")
MODEL_KEYS = ("model", "parameters")
#: The parts of a polm multimodal model that ``parts`` may give a method of their own, and a part's keys.
PART_NAMES = ("language_model", "connectors", "encoders")
PART_KEYS = ("merge_method", "parameters")
#: mergekit keys polm reads but does not support, with what to do instead.
UNSUPPORTED_KEYS = {
    "slices": "layer slices (frankenmerges, passthrough of layer ranges) are not supported; merge whole models "
              "listed under 'models:'",
    "modules": "per-module merges are not supported; merge whole models listed under 'models:'",
    "tokenizer": "building a tokenizer (the 'tokenizer' section) is not supported; the models must share one "
                 "tokenizer ('tokenizer_source: base')",
    "chat_template": "setting a chat template is not supported; the output keeps the tokenizer source's",
    "layer_range": "layer ranges (slices) are not supported; merge whole models",
}


LORA_OUTPUTS = ("base", "adapter")
LORA_COMBINES = ("svd", "concat")
#: The methods whose result is linear in the task vectors, so that ``combine: concat`` is exact for them.
LINEAR_METHODS = ("linear", "task_arithmetic")


@dataclass
class LoraMerge:
    """How LoRA adapters are merged: the ``lora`` key of a merge config (for adapters only).

    Each adapted module's update is ``delta_m = s_m B_m A_m`` with ``s_m = alpha / r`` (``alpha / sqrt(r)`` with
    rsLoRA, ``alpha_pattern`` per module). ``output: base`` merges the full weights ``W`` (the base) and
    ``W + delta_m`` exactly as full models are merged, into a transformers folder. ``output: adapter`` merges the
    updates themselves (the base's tensor is zero where the method takes a base), then writes a peft adapter:
    ``combine: svd`` factors the merged update back to ``rank`` (the best rank-``rank`` approximation), and
    ``combine: concat`` stacks the adapters' scaled factors, ``B' = [c_1 s_1 B_1, ...]``, ``A' = [A_1; ...]``
    (rank: the sum of the ranks), which is exact for the methods linear in the updates (``LINEAR_METHODS``) and
    refused for the others.
    """

    output: str = field(default="base", metadata={
        "help": "base: a full model, the updates merged into the base's weights; adapter: a new LoRA adapter",
        "choices": LORA_OUTPUTS})
    combine: str | None = field(default=None, metadata={
        "help": "with output: adapter, svd (default: the merged update factored to rank) or concat (the adapters' "
                "factors stacked; exact, for linear and task_arithmetic)", "choices": LORA_COMBINES})
    rank: int | None = field(default=None, metadata={
        "help": "with combine: svd, the new adapter's rank (default: the largest rank of the adapters)", "min": 1})

    def __post_init__(self) -> None:
        if self.output == "base" and (self.combine is not None or self.rank is not None):
            raise ValueError(f"'{'combine' if self.combine is not None else 'rank'}' applies to output: adapter; "
                             "output: base merges the updates into the base's weights")
        if self.output == "adapter" and self.combine is None:
            self.combine = "svd"
        if self.combine == "concat" and self.rank is not None:
            raise ValueError("'rank' applies to combine: svd; combine: concat's rank is the sum of the adapters' "
                             "ranks")


@dataclass
class MergeConfig:
    """What to merge and how: the keys of a merge config, also the options of the ``merge`` stage."""

    merge_method: str = field(metadata={
        "help": "a registered merge method: linear, task_arithmetic, ties, slerp, ... (polm plugins lists them)"})
    models: list = field(metadata={
        "help": "the models to merge: [{model: <folder, run stage folder or registered name>, "
                "parameters: {weight: 0.5, ...}}]"})
    base_model: str | None = field(default=None, metadata={
        "help": "the model the task vectors are taken from (methods that need one); its config and tokenizer are "
                "the output's. In a merge stage: the model the pipeline hands the stage, unless this is set"})
    parameters: dict = field(default_factory=dict, metadata={
        "help": "the method's own parameters (normalize, lambda, t, ...) and defaults of the per-model ones"})
    dtype: str | None = field(default=None, metadata={
        "help": "dtype the merged tensors are saved in (default: each tensor's dtype in the base)", "choices": DTYPES})
    out_dtype: str | None = field(default=None, metadata={
        "help": "mergekit's output dtype; wins over dtype", "choices": DTYPES})
    tokenizer_source: str | None = field(default=None, metadata={
        "help": "whose tokenizer is written: base (default) or one of the models; the vocabularies must match"})
    parts: dict = field(default_factory=dict, metadata={
        "help": "for polm multimodal models (polm's key): a method per part, {connectors: {merge_method: linear, "
                "parameters: {...}}}; parts: language_model, connectors, encoders; a part not named is merged by "
                "merge_method and parameters"})
    lora: dict = field(default_factory=dict, metadata={
        "help": "for LoRA adapters (polm's key): {output: base | adapter, combine: svd | concat, rank: N}, see "
                "LoraMerge; default output: base"})

    @property
    def saved_dtype(self) -> str | None:
        """The dtype the output is saved in, or None to keep each tensor's."""
        return self.out_dtype or self.dtype

    def lora_merge(self, where: Location | None = None) -> LoraMerge:
        """The ``lora`` key read as :class:`LoraMerge` (its defaults where it is not given).

        Raises:
            PolmError: one line naming the key: an unknown key, a value not among the choices, or ``combine`` /
                ``rank`` where they do not apply.
        """
        where = where or Location()
        if not isinstance(self.lora, dict):
            raise PolmError(f"{where('lora')}: must be a mapping, e.g. {{output: adapter, combine: svd, rank: 8}}")
        return parse_options(where("lora"), LoraMerge, self.lora)


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(MergeConfig))
#: The model a ``merge`` stage starts from, where :func:`merged_models` lists it among the models.
PIPELINE_MODEL = "(the pipeline's model)"


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method with what its metadata and its function's signature say it takes.

    Attributes:
        model_parameters: the per-model parameters and their defaults (metadata ``model_parameters``).
        parameters: the method's own keyword parameters by their keyword name, from the signature.
        aliases: config names for keyword names that cannot be written in Python (``lambda`` -> ``lambda_``).
        base: ``required``, ``optional`` or ``unused``.
        models: the exact number of models besides the base, or None for any number.
        takes_generator: whether the function takes a ``generator`` keyword (it samples).
        takes_any: whether it takes ``**options``, so that any own parameter is accepted.
    """

    name: str
    function: Callable[..., Any]
    model_parameters: dict[str, Any]
    parameters: dict[str, inspect.Parameter]
    aliases: dict[str, str]
    base: str
    models: int | None
    takes_generator: bool
    takes_any: bool

    def keyword(self, name: str) -> str:
        """The keyword a config's parameter name is passed as (``lambda`` -> ``lambda_``)."""
        return self.aliases.get(name, name)

    def own_names(self) -> list[str]:
        """The method's own parameters as a config writes them."""
        spelled = {keyword: name for name, keyword in self.aliases.items()}
        return sorted(spelled.get(name, name) for name in self.parameters)

    def is_own(self, name: str) -> bool:
        return self.keyword(name) in self.parameters or (self.takes_any and name not in self.model_parameters)

    def required(self) -> list[str]:
        """The own parameters without a default, as a config writes them."""
        return [name for name in self.own_names()
                if self.parameters[self.keyword(name)].default is inspect.Parameter.empty]


def find_merge_method(name: str) -> MergeMethod:
    """The method registered as ``name``, read from its registry entry and its function's signature.

    Raises:
        PolmError: an unknown method (with the available ones), or a plugin's method whose metadata and signature
            disagree (naming the plugin).
    """
    from polm.engine.plugins import registry

    entry = registry("merge_methods").entry(name)
    metadata = entry.metadata
    where = f"merge method '{name}' (plugin {entry.plugin})"
    try:
        signature = inspect.signature(entry.obj)
    except (TypeError, ValueError):
        raise PolmError(f"{where} is not a function with a signature") from None
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        raise PolmError(f"{where} must take (tensors, base, *, ...): the tensors of one name and the base's")
    keywords = {p.name: p for p in parameters[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    model_parameters = dict(metadata.get("model_parameters") or {})
    missing = [name for name in model_parameters if name not in keywords and not takes_any]
    if missing:
        raise PolmError(f"{where} declares the per-model parameter '{missing[0]}', which its function does not take")
    base = metadata.get("base", "optional")
    if base not in BASE_POLICIES:
        raise PolmError(f"{where} has base={base!r}; it must be one of {', '.join(BASE_POLICIES)}")
    own = {key: p for key, p in keywords.items() if key not in model_parameters and key != "generator"}
    return MergeMethod(name, entry.obj, model_parameters, own, dict(metadata.get("aliases") or {}), base,
                       metadata.get("models"), "generator" in keywords, takes_any)


class Location:
    """Where a key of a merge config is, for messages: ``merge.yaml:12: models[1].parameters``.

    Args:
        path: the config file, or None for a config given as a mapping.
        node: the file's YAML node tree (``yaml.compose``), whose marks give the lines.
        prefix: keys put before every key asked for (:meth:`within`).
    """

    def __init__(self, path: Path | None = None, node: yaml.Node | None = None,
                 prefix: tuple[str | int, ...] = ()) -> None:
        self.path = path
        self.node = node
        self.prefix = prefix

    def within(self, *keys: str | int) -> Location:
        """The location of the keys under ``keys``: a ``parts`` entry checked as a config of its own."""
        return Location(self.path, self.node, (*self.prefix, *keys))

    def __call__(self, *keys: str | int) -> str:
        keys = (*self.prefix, *keys)
        dotted = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in keys).lstrip(".")
        if self.path is None:
            return dotted or "merge config"
        line = self._line(keys)
        place = f"{self.path}:{line}" if line else str(self.path)
        return f"{place}: {dotted}" if dotted else place

    def _line(self, keys: tuple[str | int, ...]) -> int | None:
        node, line = self.node, None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                found = next(((k, v) for k, v in node.value if k.value == key), None)
                if found is None:
                    break
                line, node = found[0].start_mark.line + 1, found[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line


def read_merge_config(source: str | Path | dict[str, Any]) -> MergeConfig:
    """Read a merge config, a YAML file or a mapping, and check it (:func:`check_merge_config`); relative model
    paths in a file are looked up beside it first.

    Raises:
        PolmError: one line naming the file, the line and the key: a missing file, invalid YAML, an unsupported
            mergekit key, an unknown key (with the closest), a wrong type, or a check that fails.
    """
    relative_to = None
    if isinstance(source, dict):
        document, where = source, Location()
    else:
        path = Path(source)
        if not path.is_file():
            raise PolmError(f"merge config not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            document, node = yaml.safe_load(text), yaml.compose(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            place = f"{path}:{mark.line + 1}" if mark else str(path)
            raise PolmError(f"{place}: invalid YAML: {getattr(error, 'problem', error)}") from None
        where, relative_to = Location(path, node), path.parent
        if not isinstance(document, dict):
            raise PolmError(f"{path}: a merge config is a mapping with keys merge_method, models, base_model, ...")
    for key in document:
        _refuse_unknown(key, CONFIG_KEYS, where, (key,), "merge config keys")
    if document.get("tokenizer_source") == "union":
        raise PolmError(f"{where('tokenizer_source')}: 'union' is not supported (polm does not build tokenizers); "
                        "merge models that share one tokenizer, with tokenizer_source: base")
    try:
        config = parse_options(where(), MergeConfig, document)
    except PolmError as error:
        raise PolmError(_at_key(str(error), where, document)) from None
    check_merge_config(config, where, relative_to=relative_to)
    return config


def _refuse_unknown(key: Any, valid: tuple[str, ...], where: Location, keys: tuple[str | int, ...],
                    what: str) -> None:
    if key in valid:
        return
    if key in UNSUPPORTED_KEYS:
        raise PolmError(f"{where(*keys)}: '{key}' is not supported: {UNSUPPORTED_KEYS[key]}")
    raise PolmError(f"{where(*keys)}: unknown key '{key}'.{did_you_mean(str(key), valid)} "
                    f"Valid {what}: {', '.join(valid)}")


def _at_key(message: str, where: Location, document: dict[str, Any]) -> str:
    """``parse_options``' message with the line of the key it names, when the config came from a file."""
    prefix = f"{where()}: "
    named = re.search(r"'(\w+)'", message)
    if where.path is None or not message.startswith(prefix) or not named or named.group(1) not in document:
        return message
    return f"{where(named.group(1))}: {message[len(prefix):]}"


def check_merge_config(config: MergeConfig, where: Location | None = None, pipeline_base: bool = False,
                       relative_to: Path | None = None) -> MergeMethod:
    """Check a config against its method and the models it names, loading nothing.

    Args:
        where: where the config came from, for messages.
        pipeline_base: the base is the pipeline's model (a ``merge`` stage without ``base_model``).
        relative_to: the folder relative model paths are looked up in first (the config file's).

    Returns:
        The method, as :func:`find_merge_method` reads it.

    Raises:
        PolmError: one line naming the key: an unknown method, a model entry without ``model`` or with an unknown
            key, a parameter the method does not take (with the valid ones), a malformed value, a required own
            parameter missing, no base for a method that needs one, the wrong number of models, a model path that
            does not exist, or a ``tokenizer_source`` that is none of the inputs; a ``parts`` entry that names
            no part, or whose method and parameters fail these checks.
    """
    where = where or Location()
    try:
        method = find_merge_method(config.merge_method)
    except PolmError as error:
        raise PolmError(f"{where('merge_method')}: {error}") from None
    if not config.models:
        raise PolmError(f"{where('models')}: list at least one model, e.g. [{{model: runs/a/00-sft}}]")
    for index, entry in enumerate(config.models):
        _check_model_entry(entry, index, method, where, relative_to)
    if config.base_model is not None:
        _check_reference(config.base_model, where, ("base_model",), relative_to)
    for name, setting in config.parameters.items():
        if name in method.model_parameters:
            numeric = True
        elif method.is_own(name):
            numeric = False
        else:
            raise PolmError(f"{where('parameters', name)}: '{name}' is not a parameter of merge method "
                            f"'{method.name}'.{did_you_mean(name, [*method.own_names(), *method.model_parameters])} "
                            f"{_parameters_line(method)}")
        _check(setting, where, ("parameters", name), numeric)
    missing = [name for name in method.required() if name not in config.parameters]
    if missing:
        raise PolmError(f"{where('parameters')}: merge method '{method.name}' needs the parameter '{missing[0]}' "
                        f"(set it under the top-level parameters, e.g. {missing[0]}: 0.5)")
    has_base = config.base_model is not None or pipeline_base or _all_adapters(config, relative_to)
    if method.base == "required" and not has_base:
        raise PolmError(f"{where('base_model')}: merge method '{method.name}' needs a base_model (the model the "
                        "task vectors are taken from)")
    merged = merged_models(config, method, relative_to, pipeline_base)
    if not merged:
        raise PolmError(f"{where('models')}: merge method '{method.name}' needs at least one model besides the base")
    if method.models is not None and len(merged) != method.models:
        raise PolmError(f"{where('models')}: merge method '{method.name}' takes exactly {method.models} model(s) "
                        f"besides the base, got {len(merged)}")
    _check_tokenizer_source(config, where, has_base, relative_to)
    lora = config.lora_merge(where)
    if lora.combine == "concat" and method.name not in LINEAR_METHODS:
        raise PolmError(f"{where('lora', 'combine')}: concat is exact only for {' and '.join(LINEAR_METHODS)}, "
                        f"whose result is linear in the adapters' updates; merge method '{method.name}' is not, so "
                        "use combine: svd (the merged update factored to a rank) or output: base")
    for part in config.parts:
        _check_part(config, part, where, pipeline_base, relative_to)
    return method


def part_config(config: MergeConfig, part: str) -> MergeConfig:
    """The config the part ``part`` of ``config.parts`` is merged by: its ``merge_method`` and ``parameters``,
    the base and models of ``config``, each model's ``parameters`` less those the part's method does not take.

    Raises:
        PolmError: the part's method is not registered.
    """
    setting = config.parts[part]
    method = find_merge_method(setting["merge_method"])
    models = [{**entry, "parameters": {name: value for name, value in (entry.get("parameters") or {}).items()
                                       if name in method.model_parameters}} for entry in config.models]
    return dataclasses.replace(config, merge_method=setting["merge_method"],
                               parameters=dict(setting.get("parameters") or {}), models=models, parts={})


def _check_part(config: MergeConfig, part: Any, where: Location, pipeline_base: bool,
                relative_to: Path | None) -> None:
    """A ``parts`` entry names a part and is a mapping whose method and parameters pass :func:`check_merge_config`."""
    _refuse_unknown(part, PART_NAMES, where, ("parts", part), "parts (of a polm multimodal model)")
    setting = config.parts[part]
    if not isinstance(setting, dict) or not isinstance(setting.get("merge_method"), str):
        raise PolmError(f"{where('parts', part)}: a part is a mapping with 'merge_method' and optional "
                        "'parameters', e.g. {merge_method: linear, parameters: {normalize: true}}, "
                        f"got {setting!r}")
    for key in setting:
        _refuse_unknown(key, PART_KEYS, where, ("parts", part, key), "part keys")
    if not isinstance(setting.get("parameters") or {}, dict):
        raise PolmError(f"{where('parts', part, 'parameters')}: must be a mapping, e.g. {{normalize: true}}, "
                        f"got {setting['parameters']!r}")
    try:
        scoped = part_config(config, part)
    except PolmError as error:
        raise PolmError(f"{where('parts', part, 'merge_method')}: {error}") from None
    check_merge_config(scoped, where.within("parts", part), pipeline_base, relative_to)


def _all_adapters(config: MergeConfig, relative_to: Path | None) -> bool:
    """Whether every model is a peft adapter folder, which names its base itself (``base_model_name_or_path``)."""
    folders = [local_path(str(entry["model"]), relative_to) for entry in config.models]
    return all(folder is not None and (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / CONFIG_FILE).is_file()
               for folder in folders)


def _check_model_entry(entry: Any, index: int, method: MergeMethod, where: Location,
                       relative_to: Path | None) -> None:
    if not isinstance(entry, dict) or "model" not in entry:
        raise PolmError(f"{where('models', index)}: each model is a mapping with 'model' (a folder, a run's stage "
                        f"folder or a registered model) and optional 'parameters', got {entry!r}")
    for key in entry:
        _refuse_unknown(key, MODEL_KEYS, where, ("models", index, key), "model keys")
    _check_reference(entry["model"], where, ("models", index, "model"), relative_to)
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise PolmError(f"{where('models', index, 'parameters')}: must be a mapping, e.g. {{weight: 0.5}}, "
                        f"got {parameters!r}")
    for name, setting in parameters.items():
        if name not in method.model_parameters:
            own = (f" '{name}' is one of the method's own parameters: set it under the top-level parameters."
                   if method.is_own(name) and not method.takes_any else did_you_mean(name, method.model_parameters))
            raise PolmError(f"{where('models', index, 'parameters', name)}: '{name}' is not a per-model parameter "
                            f"of merge method '{method.name}'.{own} {_parameters_line(method)}")
        _check(setting, where, ("models", index, "parameters", name), numeric=True)


def _parameters_line(method: MergeMethod) -> str:
    per_model = ", ".join(method.model_parameters) or "none"
    own = ", ".join(method.own_names()) or "none"
    return f"Per-model parameters: {per_model}; the method's own: {own}"


def _check(setting: Any, where: Location, keys: tuple[str | int, ...], numeric: bool) -> None:
    try:
        check_setting(setting, "", numeric)
    except ValueError as error:
        raise PolmError(f"{where(*keys)}{error}") from None


def _check_reference(reference: Any, where: Location, keys: tuple[str | int, ...], relative_to: Path | None) -> None:
    """A model reference is text naming a registered model, an existing path or (otherwise) a hub id."""
    from polm.engine.plugins import registry

    if not isinstance(reference, (str, Path)) or not str(reference):
        raise PolmError(f"{where(*keys)}: must be a folder, a run's stage folder or a registered model, "
                        f"got {reference!r}")
    reference = str(reference)
    models = registry("models")
    if reference in models or local_path(reference, relative_to) is not None or not looks_like_path(reference):
        return
    raise PolmError(f"{where(*keys)}: model '{reference}' is neither a folder nor a registered model."
                    f"{did_you_mean(reference, models)} Registered: {', '.join(models) or 'none'}")


def same_model(first: Any, second: Any, relative_to: Path | None = None) -> bool:
    """Whether two references name one model: the same text, or the same local folder."""
    if str(first) == str(second):
        return True
    here, there = local_path(str(first), relative_to), local_path(str(second), relative_to)
    return here is not None and there is not None and here.resolve() == there.resolve()


def merged_models(config: MergeConfig, method: MergeMethod, relative_to: Path | None = None,
                  pipeline_base: bool = False) -> list[dict[str, Any]]:
    """The model entries the method merges: all of ``models``, less the base's own entry for a method whose base
    is required (mergekit lists the base among the models; it has no task vector of its own). In a ``merge``
    stage without ``base_model`` (``pipeline_base``), a method that uses no base (``linear``) merges the
    pipeline's model too, first, as ``{"model": PIPELINE_MODEL}`` with the top-level ``parameters``."""
    if pipeline_base and config.base_model is None and method.base == "unused":
        return [{"model": PIPELINE_MODEL}, *config.models]
    if method.base != "required" or config.base_model is None:
        return list(config.models)
    return [entry for entry in config.models if not same_model(entry["model"], config.base_model, relative_to)]


def _check_tokenizer_source(config: MergeConfig, where: Location, has_base: bool, relative_to: Path | None) -> None:
    source = config.tokenizer_source
    if source is None:
        return
    if source == "base":
        if not has_base:
            raise PolmError(f"{where('tokenizer_source')}: 'base' needs a base_model; name one of the models instead")
        return
    named = [entry["model"] for entry in config.models] + ([config.base_model] if config.base_model else [])
    if not any(same_model(source, reference, relative_to) for reference in named):
        raise PolmError(f"{where('tokenizer_source')}: {source!r} is not supported; give 'base' or one of the "
                        f"models ({', '.join(map(str, named))}); the models must share one tokenizer")
