"""The ``judge`` reward: another local language model says whether a completion is good.

The judge is asked ``template`` (rendered with its chat template when it has
one) and the reward is the probability it gives ``yes`` rather than ``no`` as
the first token of its answer: ``p(yes) / (p(yes) + p(no))``, in [0, 1]. Only
the first token of each word counts, so pick words whose first tokens differ.
(LLM-as-a-judge: Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena", https://arxiv.org/abs/2306.05685.)

Template fields: ``{prompt}`` (the prompt, a chat's last message's text when
the prompt is a chat), ``{completion}``, and every other field of the row by
its name, e.g. ``{answer}`` for rows that carry one. Literal braces are written
``{{`` and ``}}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from accelerate import PartialState

from polm.engine.encoding import Encoded, encode_prompt, pad_batch
from polm.engine.errors import PolmError

DEFAULT_TEMPLATE = ("Here is a question and an answer.\nQuestion: {prompt}\nAnswer: {completion}\n"
                    "Is the answer correct? Reply Yes or No.")


@lru_cache(maxsize=2)
def load_judge(spec: str) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of the judge: a registered model name, a checkpoint folder or a hub id; loaded once."""
    from polm.engine.models import load_model

    model, tokenizer = load_model(spec)
    return model.to(PartialState().device).eval().requires_grad_(False), tokenizer


def first_token(tokenizer: Any, word: str, option: str) -> int:
    """The first token id of ``word`` as the judge would write it.

    Raises:
        PolmError: the word is empty for this tokenizer.
    """
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PolmError(f"reward 'judge': option '{option}' ({word!r}) encodes to no token; choose a word")
    return ids[0]


def _text(prompt: Any) -> str:
    """A prompt as plain text: a chat's last message (its text parts)."""
    if isinstance(prompt, str):
        return prompt
    content = prompt[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def render(template: str, prompt: Any, completion: str, fields: dict[str, Any]) -> str:
    """``template`` with its fields filled in.

    Raises:
        PolmError: the template names a field the row does not have.
    """
    try:
        return template.format(**fields, prompt=_text(prompt), completion=completion)
    except (KeyError, IndexError) as error:
        available = ", ".join(["prompt", "completion", *sorted(fields)])
        raise PolmError(f"reward 'judge': the template names field {error} which the rows do not have; "
                        f"available fields: {available}") from None


@torch.no_grad()
def judge_reward(prompts: list[Any], completions: list[str], model: str = "polm-tiny",
                 template: str = DEFAULT_TEMPLATE, yes: str = "Yes", no: str = "No", batch_size: int = 32,
                 **fields: Sequence[Any]) -> list[float]:
    """``p(yes) / (p(yes) + p(no))`` of the judge ``model`` asked ``template`` about each completion.

    Args:
        model: a registered model name, a checkpoint folder or a hub id (anything ``load_model`` takes).
        template: the question put to the judge; see the module docstring for its fields.
        yes, no: the words compared; their first tokens' probabilities decide.
        batch_size: questions scored together.
    """
    judge, tokenizer = load_judge(model)
    device = next(judge.parameters()).device
    yes_id, no_id = first_token(tokenizer, yes, "yes"), first_token(tokenizer, no, "no")
    questions = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        row_fields = {name: values[index] for name, values in fields.items()}
        ids = encode_prompt(tokenizer, render(template, prompt, completion, row_fields))
        questions.append(Encoded(ids, ids))
    scores: list[float] = []
    for start in range(0, len(questions), batch_size):
        batch = pad_batch(questions[start: start + batch_size], tokenizer.pad_token_id)  # right-padded
        logits = judge(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits  # (b, T, V)
        last = batch["attention_mask"].sum(-1).to(device) - 1  # (b,) the last token of each question
        next_token = logits[torch.arange(len(last), device=device), last].float()  # (b, V)
        scores += torch.sigmoid(next_token[:, yes_id] - next_token[:, no_id]).cpu().tolist()
    return scores
