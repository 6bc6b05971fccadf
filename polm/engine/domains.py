"""Domains: what a plugin contributes to adapt a model to one field (code, mathematics, chemistry...).

A domain, registered through ``polm_register_domains``, bundles what adapting to its field takes: the datasets
it provides (registered as usual through ``polm_register_datasets`` and named here), a recipe of stages
(continued pretraining and/or SFT, LoRA by default), an evaluator that scores a model on the field, and
optionally the settings of a tokenizer extension. ``polm plugins`` lists each domain with what it brings;
``polm domain recipe NAME`` prints its recipe for ``polm run`` and ``polm domain eval NAME CHECKPOINT`` prints
its evaluator's metrics.

Register one like this::

    from polm import hookimpl
    from polm.engine.domains import Domain

    @hookimpl
    def polm_register_domains(register):
        register("units", Domain(description="unit conversions", datasets=("units",), recipe={...},
                                 evaluator=evaluate_units, metrics=("exact_match",)))

:func:`bits_per_byte` is the held-out measure of a text domain: it compares models whose tokenizers differ.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from polm.engine.errors import PolmError
from polm.engine.plugins import registry
from polm.engine.recipe import Recipe, load_recipe

#: How the engine calls a domain's evaluator: ``(model, tokenizer, **options) -> {metric: value}``.
Evaluator = Callable[..., dict[str, float]]
#: The leading positional arguments of an evaluator, which are not options.
EVALUATOR_ARGUMENTS = 2
#: The longest window :func:`bits_per_byte` reads at once, whatever the model's context.
MAX_WINDOW = 1024


@dataclass(frozen=True)
class Domain:
    """One domain, registered by name through ``polm_register_domains``.

    Args:
        description: one line for ``polm plugins``.
        recipe: the recipe that adapts a model to the domain, as ``polm run`` reads it (``model``, ``seed``,
            ``output_dir``, ``stages``): a YAML file's path or the same mapping in Python.
        evaluator: ``evaluator(model, tokenizer, **options) -> {metric: value}`` on the domain's held-out data;
            its keyword parameters (with defaults) are the options ``polm domain eval --option KEY=VALUE`` sets.
        datasets: the bundled datasets the domain provides or uses, by name (``stdlib-code`` for
            ``polm:stdlib-code``); each is registered through ``polm_register_datasets``.
        metrics: the names of the metrics the evaluator returns, for ``polm plugins``.
        tokenizer: settings of a tokenizer extension the domain wants (tokens to add, a corpus to learn them
            from), or None to keep the model's tokenizer.
    """

    description: str
    recipe: str | Path | Mapping[str, Any]
    evaluator: Evaluator
    datasets: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    tokenizer: Mapping[str, Any] | None = None


def domain(name: str) -> Domain:
    """The registered domain ``name``.

    Raises:
        PolmError: no domain has that name (listing those that exist), or a plugin registered something
            else than a :class:`Domain` under it.
    """
    entry = registry("domains").entry(name)
    if not isinstance(entry.obj, Domain):
        raise PolmError(f"plugin '{entry.plugin}' registered the domain '{name}' as a {type(entry.obj).__name__}; "
                        "register a polm.engine.domains.Domain")
    return entry.obj


def recipe_text(name: str) -> str:
    """The YAML text of domain ``name``'s recipe, as ``polm run`` reads it.

    Raises:
        PolmError: an unknown domain, or a recipe file that does not exist.
    """
    recipe = domain(name).recipe
    if isinstance(recipe, Mapping):
        return yaml.safe_dump(dict(recipe), sort_keys=False)
    path = Path(recipe)
    if not path.is_file():
        raise PolmError(f"domain '{name}': its recipe file {path} does not exist")
    return path.read_text(encoding="utf-8")


def domain_recipe(name: str, overrides: Sequence[str] = ()) -> Recipe:
    """Domain ``name``'s recipe, read and checked as ``polm run`` reads a file, with ``overrides``
    (``"stages.0.max_steps=10"``) applied; :meth:`Recipe.pipeline` validates its stages.

    Raises:
        PolmError: an unknown domain, or a recipe that is not one (naming the domain).
    """
    recipe = domain(name).recipe
    if not isinstance(recipe, Mapping):
        return load_recipe(recipe, list(overrides))
    with tempfile.TemporaryDirectory(prefix="polm-domain-") as folder:
        path = Path(folder) / f"{name}.yaml"
        path.write_text(recipe_text(name), encoding="utf-8")
        try:
            loaded = load_recipe(path, list(overrides))
        except PolmError as error:
            raise PolmError(str(error).replace(str(path), f"the recipe of domain '{name}'")) from None
    loaded.path = None  # relative data paths are read from the working folder; messages say "recipe"
    return loaded


def evaluate_domain(name: str, model: torch.nn.Module, tokenizer: Any, **options: Any) -> dict[str, float]:
    """Domain ``name``'s evaluator run on ``model``, ``options`` checked against its signature first.

    Raises:
        PolmError: an unknown domain, or an option the evaluator does not take (listing those it does).
    """
    return domain_evaluator(name, options)(model, tokenizer, **options)


def domain_evaluator(name: str, options: Mapping[str, Any]) -> Evaluator:
    """Domain ``name``'s evaluator, once ``options`` fit its signature (so that a mistyped option fails
    before a model loads).

    Raises:
        PolmError: an unknown domain, or an option the evaluator does not take.
    """
    evaluator = domain(name).evaluator
    parameters = list(inspect.signature(evaluator).parameters.values())[EVALUATOR_ARGUMENTS:]
    valid = [parameter.name for parameter in parameters
             if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]
    if not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        unknown = [key for key in options if key not in valid]
        if unknown:
            raise PolmError(f"domain '{name}''s evaluator has no option '{unknown[0]}'. "
                            f"Valid options: {', '.join(valid) or 'none'}")
    return evaluator


def describe_domains() -> tuple[list[dict[str, Any]], list[str]]:
    """What ``polm plugins`` shows of each domain, and a line per domain that is not well formed.

    Returns:
        ``([{name, plugin, description, datasets, recipe, metrics, tokenizer}], problems)``; ``recipe`` names
        each stage with its tuning method and data (``sft (lora) on polm:stdlib-code``).
    """
    described, problems = [], []
    known_datasets = registry("datasets")
    for entry in registry("domains").entries():
        if not isinstance(entry.obj, Domain):
            problems.append(f'plugin "{entry.plugin}" registered the domain \'{entry.name}\' as a '
                            f"{type(entry.obj).__name__}; register a polm.engine.domains.Domain")
            continue
        for dataset in entry.obj.datasets:
            if dataset not in known_datasets:
                problems.append(f'domain \'{entry.name}\' (plugin "{entry.plugin}") names the dataset '
                                f"'polm:{dataset}', which no plugin registers")
        try:
            stages = [_stage_line(stage) for stage in yaml.safe_load(recipe_text(entry.name))["stages"]]
        except (PolmError, yaml.YAMLError, KeyError, TypeError) as error:
            problems.append(f'domain \'{entry.name}\' (plugin "{entry.plugin}"): unreadable recipe: {error}')
            stages = []
        described.append({"name": entry.name, "plugin": entry.plugin, "description": entry.obj.description,
                          "datasets": [f"polm:{name}" for name in entry.obj.datasets], "recipe": stages,
                          "metrics": list(entry.obj.metrics),
                          "tokenizer": dict(entry.obj.tokenizer) if entry.obj.tokenizer is not None else None})
    return described, problems


def _stage_line(stage: Mapping[str, Any]) -> str:
    line = f"{stage['name']} ({stage.get('tuning', 'full')})"
    return f"{line} on {stage['data']}" if "data" in stage else line


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], window: int | None = None,
                  stride: int | None = None) -> float:
    """Held-out bits per byte: the negative log-likelihood of ``texts`` in bits over their UTF-8 bytes.

    ``sum over tokens of -ln p(token | context) / (ln 2 * bytes)``; unlike a per-token loss it does not depend
    on how the tokenizer cuts the text, so models with different tokenizers compare. Each text is read after
    one start token (the tokenizer's BOS, else its EOS, which ends the documents polm trains on), in windows
    of ``window`` tokens that advance by ``stride``: each token is scored once, in the first window that
    holds it with at least ``window - stride`` tokens of context where there are that many before it.

    Args:
        texts: the held-out documents, each read from its start.
        window: tokens per forward pass; default the model's ``max_position_embeddings`` (at most
            :data:`MAX_WINDOW`).
        stride: how far the window advances; default half the window.

    Returns:
        Bits per byte over all ``texts``.

    Raises:
        PolmError: the texts hold no bytes, or ``window``/``stride`` do not fit.
    """
    window = window or min(getattr(model.config, "max_position_embeddings", MAX_WINDOW) or MAX_WINDOW, MAX_WINDOW)
    stride = stride or max(1, window // 2)
    if window < 2 or not 0 < stride < window:
        raise PolmError(f"bits_per_byte needs a window of at least 2 tokens and a stride in [1, window); got "
                        f"window {window}, stride {stride}")
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    if total_bytes == 0:
        raise PolmError("bits_per_byte needs held-out text; the texts are empty")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats = 0.0
    for text in texts:
        ids = torch.tensor([start, *tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)  # (n,)
        scored, begin = 1, 0  # the next target to score; where the window starts
        while scored < len(ids):
            end = min(begin + window, len(ids))
            logits = model(input_ids=ids[None, begin:end]).logits[0].float()  # (end - begin, V)
            targets = ids[scored:end]  # (k,): predicted from the logits one position before each
            log_probs = torch.log_softmax(logits[scored - begin - 1: end - begin - 1], dim=-1)  # (k, V)
            nats -= float(log_probs.gather(1, targets[:, None]).sum())
            scored, begin = end, begin + stride
    model.train(was_training)
    return nats / (math.log(2) * total_bytes)
