"""Held-out evaluation: generation and the metrics computed on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polm.engine.answers import answers_match
from polm.engine.data import Row, load_rows, row_format
from polm.engine.errors import PolmError
from polm.engine.rl.rollout import sample


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


def exact_match(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], max_new_tokens: int = 32,
                batch_size: int = 32, show_progress: bool = False) -> dict[str, float]:
    """Greedy ``exact_match`` on rows with a reference answer, overall and per ``level`` when rows have one."""
    rows = [row for row in rows if reference(row) is not None]
    if not rows:
        raise PolmError("exact_match needs rows with an 'answer' or 'completion' to compare against")
    completions = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens, batch_size,
                           show_progress=show_progress)
    hits = [answers_match(completion, reference(row)) for completion, row in zip(completions, rows)]
    metrics = {"exact_match": sum(hits) / len(hits)}
    levels = sorted({row["level"] for row in rows if "level" in row})
    for level in levels:
        chosen = [hit for hit, row in zip(hits, rows) if row.get("level") == level]
        metrics[f"exact_match/level_{level}"] = sum(chosen) / len(chosen)
    return metrics


def evaluate(model_or_checkpoint: Any, data: Any, split: str = "test", *, tokenizer: Any = None,
             size: int | None = None, max_new_tokens: int = 32, batch_size: int = 32,
             show_progress: bool = False) -> dict[str, float]:
    """Evaluate a model or checkpoint on held-out data.

    Args:
        model_or_checkpoint: anything :func:`polm.engine.models.load_model` accepts.
        data: ``"polm:<name>"``, a JSONL path, or a list of rows.
        split: the split of a bundled dataset.
        size: evaluate on the first ``size`` rows only.

    Returns:
        ``exact_match`` (and per-level figures) for rows with reference answers.
    """
    from polm.engine.models import load_model

    model, tokenizer = load_model(model_or_checkpoint, tokenizer)
    rows = load_rows(data, split)
    if size:
        rows = rows[:size]
    return exact_match(model, tokenizer, rows, max_new_tokens, batch_size, show_progress)
