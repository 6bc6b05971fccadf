"""Sampling completions and scoring their tokens: what on-policy stages (GRPO, PPO, online DPO, RFT) share.

A :class:`Rollout` keeps the sampled tokens next to their text so that a stage
can score the exact tokens the model produced (re-tokenising the decoded text
could split it differently). Prompts are left-padded and completions
right-padded, so ``[prompt | completion]`` rows line up at the boundary and one
forward pass scores every completion token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import Progress

from polm.engine.data import Row
from polm.engine.encoding import MediaBatch, encode_prompt, media_inputs, media_parts


@dataclass
class Rollout:
    """Sampled completions in tokens and text; the samples of one prompt are consecutive rows.

    Attributes:
        prompt_ids: (N, P) prompt ids, left-padded.
        prompt_mask: (N, P) 1 on prompt tokens.
        completion_ids: (N, C) sampled ids, right-padded.
        completion_mask: (N, C) 1 on sampled tokens up to and including the one that ended the sample.
        texts: the N completions decoded without special tokens, cut after the first stop string.
        seconds: wall time spent sampling.
        media: the media parts of each row's prompt, for the prompt's placeholder ids; None for text prompts.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    seconds: float
    media: MediaBatch | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """(N, P + C) prompt and completion ids."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(N, P + C) 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        """(N,) sampled tokens per completion."""
        return self.completion_mask.sum(-1)

    @property
    def tokens_per_second(self) -> float:
        """Sampled (completion) tokens per second of sampling."""
        return float(self.completion_mask.sum()) / max(self.seconds, 1e-9)

    def select(self, indices: Sequence[int] | torch.Tensor) -> Rollout:
        """The rows at ``indices`` (for minibatches and for dropping groups)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        media = None if self.media is None else MediaBatch(self.media[i] for i in index.tolist())
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                       self.completion_mask[index], [self.texts[i] for i in index.tolist()], self.seconds, media)


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(sequences):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row))
            mask[i, width - len(row):] = 1
    return ids, mask


def _right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(ids) for ids in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(sequences):
        if row:
            ids[i, : len(row)] = torch.tensor(list(row))
            mask[i, : len(row)] = 1
    return ids, mask


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _cut(generated: list[int], stops: list[int], pad_id: int) -> list[int]:
    """The sampled tokens of one row: through the first end token, else up to the trailing padding."""
    for position, token in enumerate(generated):
        if token in stops:
            return generated[: position + 1]
    end = len(generated)
    while end and generated[end - 1] == pad_id:  # generate pads rows that stopped on a stop string
        end -= 1
    return generated[:end]


def _cut_text(text: str, stop_strings: Sequence[str]) -> str:
    ends = [text.find(stop) + len(stop) for stop in stop_strings if stop in text]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | list[Row]],
    *,
    max_new_tokens: int = 32,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    batch_size: int = 32,
    show_progress: bool = False,
) -> Rollout:
    """Sample ``num_samples`` completions of each prompt with the KV cache.

    Args:
        prompts: strings or chats, rendered with the tokenizer's chat template when it has one.
        num_samples: completions per prompt; the samples of prompt ``i`` are rows ``i*num_samples ...``.
        temperature: 0 decodes greedily.
        stop_strings: a sample also ends at the first of these strings (kept in the text).
        batch_size: rows generated together.

    Returns:
        The :class:`Rollout`; the model is left in the train/eval mode it had.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts for _ in range(num_samples)]
    media = MediaBatch(media_parts(prompt) for prompt in prompts for _ in range(num_samples))
    sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": top_p}
                                if temperature > 0 else {"do_sample": False})
    if stop_strings:
        sampling.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    generated: list[list[int]] = []
    started = time.perf_counter()
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("sampling", total=len(encoded))
        for start in range(0, len(encoded), batch_size):
            input_ids, attention_mask = _left_pad(encoded[start: start + batch_size], pad_id)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                                    **media_inputs(model, media[start: start + batch_size]), **sampling)
            generated += [_cut(row.tolist(), stops, pad_id) for row in output[:, input_ids.shape[1]:].cpu()]
            progress.advance(task, len(input_ids))
    seconds = time.perf_counter() - started
    model.train(was_training)
    prompt_ids, prompt_mask = _left_pad(encoded, pad_id)
    completion_ids, completion_mask = _right_pad(generated, pad_id)
    texts = [_cut_text(tokenizer.decode(ids, skip_special_tokens=True), stop_strings) for ids in generated]
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, seconds,
                   media if any(media) else None)


def completion_token_logps(
    model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of each sampled token under ``model`` (with gradients when enabled).

    Position ids follow the attention mask, so left-padded prompts are scored at
    the positions generation gave them.

    Args:
        temperature: divide logits by the sampling temperature, so the log-probs are those of the sampler.
        with_entropy: also return the entropy of each next-token distribution.

    Returns:
        ``logps`` (N, C) float32, 0 on padding; ``entropy`` (N, C) or None.
    """
    device = next(model.parameters()).device
    input_ids = rollout.input_ids.to(device)
    attention_mask = rollout.attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, **media_inputs(model, rollout.media)).logits  # (N, P + C, V)
    width = rollout.completion_ids.shape[1]
    logits = logits[:, -width - 1: -1].float() / temperature  # (N, C, V): position t predicts token t + 1
    targets = rollout.completion_ids.to(device)  # (N, C)
    mask = rollout.completion_mask.to(device)
    log_norm = logits.logsumexp(-1)  # (N, C)
    logps = (torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - log_norm) * mask
    if not with_entropy:
        return logps, None
    probs = torch.softmax(logits, -1)
    entropy = (log_norm - (probs * logits).sum(-1)) * mask  # H = logsumexp(z) - sum p z
    return logps, entropy


def in_chunks(score: Callable[[Rollout], Any], rollout: Rollout, rows: int) -> Any:
    """``score(rollout)`` computed ``rows`` rows at a time, to bound the memory of a large rollout.

    Args:
        score: ``rollout -> (N, ...) tensor``, or a tuple of them (each concatenated along the rows).

    A rollout of at most ``rows`` rows is scored in one call, as it is.
    """
    total = len(rollout.texts)
    if total <= rows:
        return score(rollout)
    parts = [score(rollout.select(range(start, min(start + rows, total)))) for start in range(0, total, rows)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)
