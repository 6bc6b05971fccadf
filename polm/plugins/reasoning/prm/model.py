"""A process reward model (PRM): P(right) for every step of a solution, with one of two heads.

* ``classifier``: a per-token two-class head (wrong, right) on a causal LM's
  backbone, read where each step ends (Lightman et al. 2023). It is a
  transformers token-classification model (``LlamaForTokenClassification`` for
  polm-tiny), loaded with ``AutoModelForTokenClassification.from_pretrained``.
* ``likelihood``: the causal LM itself; a step's score is the probability of its
  least likely token (:mod:`polm.plugins.reasoning.prm.likelihood`). Its config
  carries ``polm_prm_head: "likelihood"``; it loads with
  ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from polm.engine.encoding import IGNORE_INDEX, pad_batch
from polm.engine.errors import PolmError
from polm.engine.models import stage_model_folder
from polm.engine.quiet import no_transformers_progress
from polm.plugins.reasoning.prm.likelihood import step_token_logps
from polm.plugins.reasoning.prm.steps import Span, encode_solution, pad_step_index, step_spans

LABELS = {0: "wrong", 1: "right"}
HEADS = ("classifier", "likelihood")
HEAD_KEY = "polm_prm_head"  # the config attribute that marks a likelihood PRM


def prm_head(model: torch.nn.Module) -> str | None:
    """``"classifier"`` or ``"likelihood"`` for a PRM, None for any other model."""
    config = getattr(model, "config", None)
    if getattr(config, HEAD_KEY, None) == "likelihood":
        return "likelihood"
    labels = list(getattr(config, "id2label", {}).values())
    if type(model).__name__.endswith("ForTokenClassification") and labels == list(LABELS.values()):
        return "classifier"
    return None


def is_process_reward_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PRM with either head."""
    return prm_head(model) is not None


def process_reward_model(causal_lm: PreTrainedModel, head: str = "classifier") -> PreTrainedModel:
    """A PRM made from a copy of ``causal_lm``: its backbone under a new score head (seeded by the caller)
    for ``classifier``, the whole LM for ``likelihood``.

    Raises:
        PolmError: for an unknown head, or if transformers has no token-classification model for the
            architecture.
    """
    if head not in HEADS:
        raise PolmError(f"unknown PRM head '{head}'; available heads = {list(HEADS)}")
    if head == "likelihood":
        prm = copy.deepcopy(causal_lm)
        setattr(prm.config, HEAD_KEY, "likelihood")
        return prm
    config = copy.deepcopy(causal_lm.config)
    config.num_labels, config.id2label = 2, dict(LABELS)
    config.label2id = {label: index for index, label in LABELS.items()}
    try:
        prm = AutoModelForTokenClassification.from_config(config)
    except ValueError as error:
        raise PolmError(f"no token-classification head for model type '{config.model_type}' in transformers, "
                        "so it cannot become a process reward model") from error
    getattr(prm, prm.base_model_prefix).load_state_dict(getattr(causal_lm, causal_lm.base_model_prefix).state_dict())
    return prm


def step_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the step labels at step ends (the PRM objective of Lightman et al. 2023,
    "Let's Verify Step by Step", arXiv:2305.20050).

    Args:
        logits: (B, T, 2) per-token class logits.
        labels: (B, T) 0 or 1 at step ends, ``-100`` elsewhere.

    Returns:
        ``(loss, {"step_accuracy": ...})``.
    """
    labelled = labels != IGNORE_INDEX  # (B, T)
    loss = F.cross_entropy(logits[labelled].float(), labels[labelled])
    accuracy = (logits[labelled].argmax(-1) == labels[labelled]).float().mean()
    return loss, {"step_accuracy": float(accuracy)}


@torch.no_grad()
def step_scores(prm: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], completions: Sequence[str],
                spans: Sequence[Sequence[Span]] | None = None, separator: str = "\n",
                batch_size: int = 32) -> list[list[float]]:
    """P(right) of every step of every completion; a completion without steps gets ``[]``.

    Args:
        spans: each completion's step spans; by default :func:`~polm.plugins.reasoning.prm.steps.step_spans`
            with ``separator``.
    """
    if spans is None:
        spans = [step_spans(completion, separator) for completion in completions]
    head = prm_head(prm)
    device = next(prm.parameters()).device
    was_training = prm.training
    prm.eval()
    scores: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        examples = [encode_solution(tokenizer, prompt, completion, solution_spans) for prompt, completion, solution_spans
                    in zip(prompts[start:end], completions[start:end], spans[start:end])]
        batch = pad_batch(examples, tokenizer.pad_token_id)
        input_ids = batch["input_ids"].to(device)
        logits = prm(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
        if head == "likelihood":
            step_index = pad_step_index(examples).to(device)
            counts = [len(solution_spans) for solution_spans in spans[start:end]]
            right = step_token_logps(logits, input_ids, step_index, max(counts, default=0)).exp().cpu()  # (B, S)
            scores += [right[row, :count].tolist() for row, count in enumerate(counts)]
        else:
            right = torch.softmax(logits.float(), -1)[..., 1].cpu()  # (B, T)
            scores += [right[row][batch["labels"][row] != IGNORE_INDEX].tolist() for row in range(len(examples))]
    prm.train(was_training)
    return scores


def load_process_reward_model(path: str | Path) -> tuple[PreTrainedModel, Any]:
    """A PRM saved by the ``prm`` stage: its checkpoint folder, or the stage folder holding ``final/``.

    Raises:
        PolmError: if the folder holds no PRM.
    """
    path = stage_model_folder(Path(path))
    if not (path / "config.json").is_file():
        raise PolmError(f"no process reward model in {path}; point to the folder of a 'prm' stage")
    likelihood = getattr(AutoConfig.from_pretrained(path), HEAD_KEY, None) == "likelihood"
    with no_transformers_progress():
        model = (AutoModelForCausalLM if likelihood else AutoModelForTokenClassification).from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if not is_process_reward_model(model):
        raise PolmError(f"{path} holds a {type(model).__name__}, not a process reward model from the 'prm' stage")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
