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
from polm.plugins.integration.merge.inputs import local_path, looks_like_path
from polm.plugins.integration.merge.parameters import check_setting

DTYPES = ("float32", "float16", "bfloat16")
BASE_POLICIES = ("required", "optional", "unused")
MODEL_KEYS = ("model", "parameters")
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

    @property
    def saved_dtype(self) -> str | None:
        """The dtype the output is saved in, or None to keep each tensor's."""
        return self.out_dtype or self.dtype


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
    """

    def __init__(self, path: Path | None = None, node: yaml.Node | None = None) -> None:
        self.path = path
        self.node = node

    def __call__(self, *keys: str | int) -> str:
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
            does not exist, or a ``tokenizer_source`` that is none of the inputs.
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
    has_base = config.base_model is not None or pipeline_base
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
    return method


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
