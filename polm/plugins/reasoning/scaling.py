"""Inference-time scaling: spend more samples (or rounds) per question for a better answer.

* :func:`self_consistency`: ``k`` samples, the most frequent extracted answer wins
  (Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning in Language Models",
  arXiv:2203.11171).
* :func:`best_of_n`: ``n`` samples, the one a registered reward (for example ``prm``) scores highest
  (the verifier re-ranking of Cobbe et al. 2021, arXiv:2110.14168; Lightman et al. 2023, arXiv:2305.20050).
* :func:`self_refine`: the model critiques its answer, then revises it, for ``rounds`` rounds
  (Madaan et al. 2023, "Self-Refine: Iterative Refinement with Self-Feedback", arXiv:2303.17651).

Each is an inference method as ``polm_register_inference_methods`` defines them: it takes rows and
returns one completion per row, which the engine grades like greedy completions
(:func:`polm.engine.evaluation.scaled_exact_match`, ``polm eval --method NAME``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from polm.engine.answers import extract_answer
from polm.engine.data import Row
from polm.engine.errors import PolmError
from polm.engine.evaluation import generate
from polm.engine.rewards import score_weighted

CRITIQUE_TEMPLATE = "Check the answer above step by step. Is it right? Say what is wrong, if anything."
REVISE_TEMPLATE = "Taking that into account, answer the question again: {prompt}"


def _groups(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start: start + size] for start in range(0, len(items), size)]


def majority_vote(completions: Sequence[str], k: int) -> list[str]:
    """Per consecutive group of ``k`` completions, the first one whose extracted answer is the most frequent.

    Answers are compared after :func:`~polm.engine.answers.extract_answer`; a tie goes to the
    answer sampled first.
    """
    chosen = []
    for samples in _groups(completions, k):
        answers = [extract_answer(sample) for sample in samples]
        winner = Counter(answers).most_common(1)[0][0]  # Counter keeps first-seen order among equal counts
        chosen.append(samples[answers.index(winner)])
    return chosen


def self_consistency(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], k: int = 8,
                     temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 32,
                     stop_strings: Sequence[str] = ()) -> list[str]:
    """The majority answer of ``k`` samples of each row's ``prompt`` (see :func:`majority_vote`)."""
    if k < 1:
        raise PolmError(f"self_consistency needs k >= 1 samples, got {k}")
    completions = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens,
                           temperature=temperature, top_p=top_p, num_samples=k, stop_strings=stop_strings)
    return majority_vote(completions, k)


def pick_best(rows: Sequence[Row], completions: Sequence[str], n: int, reward: str = "prm",
              reward_options: Mapping[str, Any] | None = None) -> list[str]:
    """Per row, the highest-scoring of its ``n`` consecutive completions under the registered ``reward``
    (the first one on ties)."""
    repeated = [row for row in rows for _ in range(n)]
    scores, _ = score_weighted({reward: 1.0}, repeated, completions, {reward: dict(reward_options or {})})
    return [samples[max(range(len(values)), key=values.__getitem__)]
            for samples, values in zip(_groups(completions, n), _groups(scores, n))]


def best_of_n(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], n: int = 8, reward: str = "prm",
              reward_options: Mapping[str, Any] | None = None, temperature: float = 0.7, top_p: float = 1.0,
              max_new_tokens: int = 32, stop_strings: Sequence[str] = ()) -> list[str]:
    """The highest-scoring of ``n`` samples per row under the registered ``reward`` (first one on ties).

    Args:
        rows: rows with a ``prompt`` and whatever fields the reward reads.
        reward_options: keyword options of the reward, e.g. ``{"checkpoint": "runs/x/01-prm"}`` for ``prm``.
    """
    if n < 1:
        raise PolmError(f"best_of_n needs n >= 1 samples, got {n}")
    completions = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens,
                           temperature=temperature, top_p=top_p, num_samples=n, stop_strings=stop_strings)
    return pick_best(rows, completions, n, reward, reward_options)


def self_refine(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], rounds: int = 1,
                critique_template: str = CRITIQUE_TEMPLATE, revise_template: str = REVISE_TEMPLATE,
                max_new_tokens: int = 32, critique_tokens: int = 64) -> list[str]:
    """Greedy answers to each row's text ``prompt`` improved by ``rounds`` of critique-and-revise in one chat.

    Each round asks the model ``critique_template`` about its last answer, then
    ``revise_template`` (``{prompt}`` is the question) for a new answer. A model
    never trained to critique (polm-tiny) is not expected to gain from it.
    """
    if rounds < 0:
        raise PolmError(f"self_refine needs rounds >= 0, got {rounds}")
    if "{prompt}" not in revise_template:
        raise PolmError("self_refine's revise_template must contain '{prompt}' (the question)")
    prompts = [row["prompt"] for row in rows]
    chats: list[list[Row]] = [[{"role": "user", "content": prompt}] for prompt in prompts]
    answers = generate(model, tokenizer, chats, max_new_tokens)
    for _ in range(rounds):
        chats = [chat + [{"role": "assistant", "content": answer}, {"role": "user", "content": critique_template}]
                 for chat, answer in zip(chats, answers)]
        critiques = generate(model, tokenizer, chats, critique_tokens)
        chats = [chat + [{"role": "assistant", "content": critique},
                         {"role": "user", "content": revise_template.format(prompt=prompt)}]
                 for chat, critique, prompt in zip(chats, critiques, prompts)]
        answers = generate(model, tokenizer, chats, max_new_tokens)
    return answers
