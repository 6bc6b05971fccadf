"""Held-out evaluation: generation and the metrics computed on it.

Completions come from greedy decoding or from a registered inference-time scaling method
(``polm_register_inference_methods``, ``polm eval --method NAME``); either way they are graded
with ``exact_match`` against each row's reference answer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from polm.engine.answers import answers_match
from polm.engine.data import Row, load_rows, row_format
from polm.engine.errors import PolmError, did_you_mean
from polm.engine.retrieval import DEFAULT_RETRIEVER, DEFAULT_TOP_K, DocumentStore, with_passages
from polm.engine.rl.rollout import sample

#: How the engine calls an inference method: ``(model, tokenizer, rows, *, max_new_tokens, **options)``.
InferenceMethod = Callable[..., list[str]]
#: The leading positional arguments of an inference method, which are not options.
METHOD_ARGUMENTS = 3


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | list[Row]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    show_progress: bool = False,
    num_samples: int = 1,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Complete each prompt (chat-templated when the tokenizer has a template); ``temperature`` 0 is greedy.

    With ``num_samples`` > 1 the samples of prompt ``i`` are entries ``i*num_samples ...``.
    See :func:`polm.engine.rl.rollout.sample` for the tokens behind the text.
    """
    return sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                  temperature=temperature, top_p=top_p, stop_strings=stop_strings, batch_size=batch_size,
                  show_progress=show_progress).texts


def reference(row: Row) -> str | None:
    """The expected answer of a row, if it has one."""
    fmt = row_format(row)
    return {"task": row.get("answer"), "completion": row.get("completion"), "preference": row.get("chosen")}.get(fmt)


def graded_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows with a reference answer to grade against.

    Raises:
        PolmError: none has one.
    """
    rows = [row for row in rows if reference(row) is not None]
    if not rows:
        raise PolmError("exact_match needs rows with an 'answer' or 'completion' to compare against")
    return rows


def grade(rows: Sequence[Row], completions: Sequence[str]) -> dict[str, float]:
    """``exact_match`` of one completion per row against its reference, overall and per ``level`` if rows have one."""
    hits = [answers_match(completion, reference(row)) for completion, row in zip(completions, rows)]
    metrics = {"exact_match": sum(hits) / len(hits)}
    for level in sorted({row["level"] for row in rows if "level" in row}):
        chosen = [hit for hit, row in zip(hits, rows) if row.get("level") == level]
        metrics[f"exact_match/level_{level}"] = sum(chosen) / len(chosen)
    return metrics


def exact_match(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], max_new_tokens: int = 32,
                batch_size: int = 32, show_progress: bool = False) -> dict[str, float]:
    """Greedy ``exact_match`` on rows with a reference answer, overall and per ``level`` when rows have one."""
    rows = graded_rows(rows)
    completions = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens, batch_size,
                           show_progress=show_progress)
    return grade(rows, completions)


def inference_method(name: str, options: Mapping[str, Any]) -> InferenceMethod:
    """The registered inference method ``name``, once ``options`` fit its signature.

    Only the top-level keys are checked (``reward_options`` of ``{"reward_options": {"checkpoint": ...}}``);
    the method checks the values itself.

    Raises:
        PolmError: an unknown method (listing the registered ones), an option it does not take
            (listing those it does), or one it needs that is missing.
    """
    from polm.engine.plugins import registry

    method = registry("inference_methods").get(name)
    parameters = list(inspect.signature(method).parameters.values())[METHOD_ARGUMENTS:]
    named = [parameter for parameter in parameters if parameter.name != "max_new_tokens"
             and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]
    valid = [parameter.name for parameter in named]
    takes_any = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)
    for key in options:
        if key == "max_new_tokens":
            raise PolmError(f"inference method '{name}': max_new_tokens is not an option but its own setting "
                            "(polm eval: --max-new-tokens N)")
        if key not in valid and not takes_any:
            raise PolmError(f"inference method '{name}' has no option '{key}'.{did_you_mean(key, valid)} "
                            f"Valid options: {', '.join(valid) or 'none'}")
    for parameter in named:
        if parameter.default is parameter.empty and parameter.name not in options:
            raise PolmError(f"inference method '{name}' needs the option '{parameter.name}' "
                            f"(polm eval: --option {parameter.name}=VALUE)")
    return method


def scaled_exact_match(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], method: str,
                       max_new_tokens: int = 32, **options: Any) -> dict[str, float]:
    """``exact_match`` (overall and per ``level``) of the completions the inference method ``method`` gives.

    Args:
        method: a name registered through ``polm_register_inference_methods``, e.g. ``self_consistency``.
        options: that method's options (``k``, ``temperature``...), checked by :func:`inference_method`.

    Raises:
        PolmError: see :func:`inference_method`; or the method did not return one completion per row.
    """
    run = inference_method(method, options)
    rows = graded_rows(rows)
    completions = run(model, tokenizer, rows, max_new_tokens=max_new_tokens, **options)
    if len(completions) != len(rows):
        raise PolmError(f"inference method '{method}' returned {len(completions)} completions for {len(rows)} "
                        "rows; it must return one per row")
    return grade(rows, completions)


def evaluate(model_or_checkpoint: Any, data: Any, split: str = "test", *, tokenizer: Any = None,
             size: int | None = None, max_new_tokens: int = 32, batch_size: int = 32,
             show_progress: bool = False, method: str | None = None,
             method_options: Mapping[str, Any] | None = None, documents: Any = None,
             documents_split: str = "train", retriever: str = DEFAULT_RETRIEVER,
             top_k: int = DEFAULT_TOP_K) -> dict[str, float]:
    """Evaluate a model or checkpoint on held-out data.

    Args:
        model_or_checkpoint: anything :func:`polm.engine.models.load_model` accepts.
        data: ``"polm:<name>"``, a JSONL path, or a list of rows.
        split: the split of a bundled dataset.
        size: evaluate on the first ``size`` rows only.
        method: a registered inference-time scaling method; None decodes greedily.
        method_options: the options of ``method``, checked before the model loads.
        documents: passages (``polm:<name>``, a file of ``{id, text}`` rows, a list) to answer with: each
            question is asked with its best ``top_k`` passages by ``retriever``, in the prompt format
            ``rag_sft`` tunes on (:mod:`polm.engine.retrieval`); None answers closed-book.
        documents_split: the split of a bundled ``documents`` set.

    Returns:
        ``exact_match`` (and per-level figures) for rows with reference answers.
    """
    from polm.engine.models import load_model

    method_options = dict(method_options or {})
    if method is not None:
        inference_method(method, method_options)  # a mistyped option fails before the model loads
    elif method_options:
        raise PolmError(f"options {', '.join(method_options)} belong to an inference method; name it "
                        "(polm eval: --method NAME)")
    store = DocumentStore.from_spec(documents, documents_split, retriever) if documents is not None else None
    model, tokenizer = load_model(model_or_checkpoint, tokenizer)
    rows = load_rows(data, split)
    if size:
        rows = rows[:size]
    if store is not None:
        rows = with_passages(rows, store, top_k)
    if method is not None:
        return scaled_exact_match(model, tokenizer, rows, method, max_new_tokens, **method_options)
    return exact_match(model, tokenizer, rows, max_new_tokens, batch_size, show_progress)
