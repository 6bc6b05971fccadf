"""Reward models: a causal LM's backbone under a one-number head, saved as plain transformers folders.

A reward model is ``AutoModelForSequenceClassification`` with ``num_labels=1``
built from the policy's config, with the policy's backbone weights and a fresh
score head. transformers reads the score at the rightmost token that is not
``pad_token_id``: with right-padded rows, the last token of the completion.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from polm.engine.encoding import encode_completion, pad_batch
from polm.engine.errors import PolmError
from polm.engine.models import stage_model_folder
from polm.engine.quiet import no_transformers_progress
from polm.engine.tuning import is_peft, unwrap_peft


def build_reward_model(policy: torch.nn.Module, pad_token_id: int) -> torch.nn.Module:
    """A reward model with ``policy``'s backbone (adapters merged, on a copy) and a new score head.

    The head is initialised by transformers from the global RNG, so seed it before calling.

    Raises:
        PolmError: the architecture has no sequence-classification class in transformers.
    """
    from transformers import AutoModelForSequenceClassification

    causal = unwrap_peft(copy.deepcopy(policy)) if is_peft(policy) else policy
    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = None
    try:
        reward_model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as error:
        raise PolmError(f"model type '{config.model_type}' has no sequence-classification head in transformers, "
                        f"so no reward model can be built from it: {str(error).splitlines()[0]}") from None
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    backbone.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
    return reward_model.to(next(policy.parameters()).device)


def is_reward_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a one-score sequence classifier (as :func:`build_reward_model` makes)."""
    return type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels == 1


def resolve_reward_model_path(path: str | Path) -> Path:
    """The folder holding a reward model: ``path``, or its ``final/`` when ``path`` is a stage folder of a run.

    Raises:
        PolmError: no such folder, or it holds no model config.
    """
    folder = stage_model_folder(Path(path).expanduser())
    if not (folder / "config.json").is_file():
        raise PolmError(f"reward model '{path}' not found: expected a folder with config.json (a reward_model "
                        "stage's folder or its final/); train one with the reward_model stage")
    return folder


def load_reward_model(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """``(reward model, tokenizer)`` from a folder written by the ``reward_model`` stage, in eval mode.

    Loaded once per folder and version (kept while the files are unchanged), on this process's device.
    """
    folder = resolve_reward_model_path(path)
    stamp = max(file.stat().st_mtime_ns for file in folder.iterdir() if file.is_file())
    return _load(str(folder.resolve()), stamp)


@lru_cache(maxsize=2)
def _load(folder: str, stamp: int) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "num_labels", None) != 1:
        raise PolmError(f"{folder} is not a reward model: its config has num_labels={config.num_labels}, "
                        "expected 1 (a reward_model stage's output)")
    with no_transformers_progress():
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(PartialState().device).eval().requires_grad_(False), tokenizer


@torch.no_grad()
def score_completions(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], completions: Sequence[str],
                      batch_size: int = 32) -> list[float]:
    """The reward model's score of each ``prompt + completion``, encoded as in training (chat template).

    Returns:
        One float per completion.
    """
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id
    scores: list[float] = []
    for start in range(0, len(completions), batch_size):
        encoded = [encode_completion(tokenizer, prompt, completion)
                   for prompt, completion in zip(prompts[start: start + batch_size],
                                                 completions[start: start + batch_size])]
        batch = pad_batch(encoded, pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits  # (b, 1)
        scores += logits[:, 0].float().cpu().tolist()
    return scores


def reward_model_reward(prompts: list[Any], completions: list[str], path: str | None = None, batch_size: int = 32,
                        **fields: Any) -> list[float]:
    """The ``reward_model`` reward: the score a trained reward model gives each completion.

    Args:
        path: the reward model's folder (a ``reward_model`` stage's folder or its ``final/``);
            set it with ``reward_options: {reward_model: {path: ...}}``.
        batch_size: completions scored together.

    Raises:
        PolmError: ``path`` unset, or no reward model there.
    """
    _check_reward_model_options(path)
    model, tokenizer = load_reward_model(path)
    return score_completions(model, tokenizer, prompts, completions, batch_size)


def _check_reward_model_options(path: str | None = None, batch_size: int = 32) -> None:
    """``path`` is set and names a reward model's folder: the reward's options, checked before a stage writes."""
    if path is None:
        raise PolmError("option 'path' is not set: set reward_options: {reward_model: {path: <reward_model stage "
                        "folder>}}")
    resolve_reward_model_path(path)


reward_model_reward.check_options = _check_reward_model_options  # type: ignore[attr-defined]
