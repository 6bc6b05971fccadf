"""How well an edit took and what it disturbed, scored greedily as the issue asks (not ROME's probability
comparisons): a prompt *yields* a target when greedy decoding of as many tokens as the target has gives exactly
the target's tokens, checked in one teacher-forced pass.

- ``efficacy``: the share of requests whose prompt yields the new target;
- ``paraphrase``: the share of all requests' paraphrases that yield it;
- ``neighbourhood``: the share of neighbourhood prompts that still yield their own answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polm.plugins.integration.editing.model import pad_id, padded, tokenize
from polm.plugins.integration.editing.requests import EditRequest


def yields(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
           batch_size: int = 32) -> list[bool]:
    """For each ``(prompt, target)``: greedy decoding of the prompt begins with the target's tokens."""
    device = next(model.parameters()).device
    hits: list[bool] = []
    training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        batch = [tokenize(tokenizer, prompt, None, target) for prompt, target in pairs[start:start + batch_size]]
        ids, mask = padded(batch, pad_id(tokenizer), device)
        with torch.no_grad():
            predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (B, T)
        for row, tokens in enumerate(batch):
            span = predicted[row, tokens.answer_start:tokens.answer_start + len(tokens.target)]
            hits.append(span.tolist() == tokens.target)
    model.train(training)
    return hits


def edit_scores(model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> dict[str, float]:
    """``efficacy`` over the requests, and ``paraphrase`` and ``neighbourhood`` where the requests carry any."""
    metrics = {"efficacy": _mean(yields(model, tokenizer, [(r.prompt, r.target) for r in requests]))}
    paraphrases = [(prompt, r.target) for r in requests for prompt in r.paraphrases]
    if paraphrases:
        metrics["paraphrase"] = _mean(yields(model, tokenizer, paraphrases))
    neighbours = [pair for r in requests for pair in r.neighbourhood]
    if neighbours:
        metrics["neighbourhood"] = _mean(yields(model, tokenizer, neighbours))
    return metrics


def _mean(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits)
