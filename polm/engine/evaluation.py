"""Held-out evaluation: generation and the metrics computed on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import Progress

from polm.engine.answers import answers_match
from polm.engine.data import Row, load_rows, row_format
from polm.engine.encoding import encode_prompt
from polm.engine.errors import PolmError


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | list[Row]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    show_progress: bool = False,
) -> list[str]:
    """Complete each prompt (chat-templated when the tokenizer has a template).

    Batches are left-padded and decoded with the KV cache; ``temperature`` 0 is greedy.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    completions: list[str] = []
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("generating", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(encoded):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                attention_mask[i, width - len(ids):] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
                "do_sample": False}
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            for row in output[:, width:]:
                completions.append(tokenizer.decode(row, skip_special_tokens=True))
            progress.advance(task, len(encoded))
    model.train(was_training)
    return completions


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
