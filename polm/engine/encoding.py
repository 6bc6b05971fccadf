"""Turning rows into token ids and loss masks for causal language models.

Prompts go through the tokenizer's chat template when it has one, so that
training and evaluation see the same text the model will be asked with.
Labels are ``-100`` wherever no loss is taken: the prompt, the user and
system turns of a chat, and padding.

Media parts (``{"type": "image" | "audio", "path": ...}``) become one
placeholder id each (a negative id, which no vocabulary has, as in LLaVA)
and travel beside the ids as :attr:`Encoded.media`, then as the batch's
``media`` (:class:`MediaBatch`). The token stream does not depend on the
model: a multimodal model expands each placeholder into its encoder's tokens
and returns logits aligned with the ids it was given, so loss masks,
packing offsets and log-prob gathers stay token for token what they are for
text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, TypeVar

import torch

from polm.engine.chat_template import assistant_frame, assistant_spans, render_text
from polm.engine.data import Row, row_format
from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.engine.media import reads_media

IGNORE_INDEX = -100
EncodedRow = TypeVar("EncodedRow")
#: The placeholder id of each media part in ``input_ids``; LLaVA's convention of ids below any vocabulary.
MEDIA_TOKEN_IDS = {"image": -200, "audio": -201}
_MEDIA_MARKERS = {f"<|{kind}|>": token_id for kind, token_id in MEDIA_TOKEN_IDS.items()}
_MARKER_PATTERN = re.compile("(" + "|".join(re.escape(marker) for marker in _MEDIA_MARKERS) + ")")


@dataclass
class Encoded:
    """One training example: ``input_ids`` and ``labels`` of equal length.

    ``media`` holds the media parts (``{"type", "path"}``) of the placeholder
    ids in ``input_ids``, in order; empty for text.
    """

    input_ids: list[int]
    labels: list[int]
    media: list[Row] = field(default_factory=list)


class MediaBatch(list):
    """The media parts of each row of a batch (a list of lists, ``[]`` for text rows).

    Media are read by the model that encodes them, so moving a batch to a
    device leaves them as they are: ``to`` returns the batch itself, and code
    written as ``{k: v.to(device) for k, v in batch.items()}`` keeps working.
    """

    def to(self, *args: Any, **kwargs: Any) -> MediaBatch:
        return self


def media_parts(messages: str | list[Row]) -> list[Row]:
    """The image and audio parts of a prompt or chat, in the order they are rendered."""
    if isinstance(messages, str):
        return []
    return [part for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part["type"] in MEDIA_TOKEN_IDS]


def media_inputs(model: torch.nn.Module, media: Sequence[list[Row]] | None) -> dict[str, Any]:
    """The ``media=`` argument of a model call: nothing for text, so text-only models are called as before.

    Raises:
        PolmError: the rows hold media and ``model`` cannot read them.
    """
    if not media or not any(media):
        return {}
    if not reads_media(model):
        kinds = sorted({part["type"] for parts in media for part in parts})
        raise PolmError(
            f"the rows hold {', '.join(kinds)} content, which the text-only model {type(model).__name__} cannot "
            "read; start from a multimodal model (an 'align' stage with encoders, or a saved multimodal folder)"
        )
    return {"media": media if isinstance(media, MediaBatch) else MediaBatch(media)}


def as_messages(prompt: str | list[Row]) -> list[Row]:
    """A prompt as a chat: a string becomes one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _with_markers(messages: list[Row]) -> list[Row]:
    """Messages with string content: text parts joined, each media part written as its marker."""
    return [
        {**m, "content": "".join(p["text"] if p["type"] == "text" else f"<|{p['type']}|>" for p in m["content"])}
        if isinstance(m["content"], list) else m
        for m in messages
    ]


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text``; each media marker becomes its placeholder id."""
    ids: list[int] = []
    for piece in _MARKER_PATTERN.split(text):
        if piece in _MEDIA_MARKERS:
            ids.append(_MEDIA_MARKERS[piece])
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def render_chat(tokenizer: Any, messages: list[Row], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, one placeholder per media part."""
    return _tokenize(tokenizer, render_text(tokenizer, _with_markers(messages), add_generation_prompt))


def _tokenize_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (as :func:`_tokenize`) and whether each token falls in one of ``spans``.

    ``text`` is tokenized whole, as the model reads it, and a token counts as inside a span when its
    characters overlap one (a fast tokenizer's offsets). A tokenizer without offsets tokenizes the
    text between span boundaries piece by piece instead.
    """
    ids: list[int] = []
    inside: list[bool] = []
    start = 0
    for piece in _MARKER_PATTERN.split(text):
        if piece in _MEDIA_MARKERS:
            ids.append(_MEDIA_MARKERS[piece])
            inside.append(False)
        elif piece:
            for token_id, (first, last) in _tokens_with_offsets(tokenizer, piece, start, spans):
                ids.append(token_id)
                inside.append(any(first < end and last > begin or begin <= first == last < end
                                  for begin, end in spans))
        start += len(piece)
    return ids, inside


def _tokens_with_offsets(tokenizer: Any, piece: str, start: int,
                         spans: list[tuple[int, int]]) -> list[tuple[int, tuple[int, int]]]:
    """Each token of ``piece`` (which begins at ``start`` of the text) with its character range in the text."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        return [(token_id, (start + first, start + last))
                for token_id, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    edges = (edge - start for span in spans for edge in span)
    cuts = sorted({0, len(piece), *(edge for edge in edges if 0 < edge < len(piece))})
    return [(token_id, (start + first, start + last)) for first, last in pairwise(cuts)
            for token_id in tokenizer(piece[first:last], add_special_tokens=False)["input_ids"]]


def _with_media(input_ids: list[int], labels: list[int], parts: list[Row]) -> Encoded:
    """An example whose placeholders carry no label, checked against its media parts."""
    placeholders = sum(token_id in _MEDIA_MARKERS.values() for token_id in input_ids)
    if placeholders != len(parts):
        markers = ", ".join(_MEDIA_MARKERS)
        raise PolmError(
            f"a row renders {placeholders} media placeholders for {len(parts)} media parts; its text must not "
            f"contain the markers {markers} (polm writes them for image and audio parts)"
        )
    labels = [IGNORE_INDEX if token_id < 0 else label for token_id, label in zip(input_ids, labels)]
    return Encoded(input_ids, labels, parts)


def encode_prompt(tokenizer: Any, prompt: str | list[Row]) -> list[int]:
    """The token ids a model is given to answer ``prompt``."""
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, as_messages(prompt), add_generation_prompt=True)
    if not isinstance(prompt, str):
        render_chat(tokenizer, prompt, add_generation_prompt=True)  # raises the no-template error
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer: Any, prompt: str | list[Row], completion: str) -> Encoded:
    """Prompt and completion with the loss on the completion tokens only.

    With a chat template the prompt is rendered with its generation prompt, exactly as a model is asked
    at inference, and the completion is what the template writes for an assistant turn after it: its
    opening, the completion and its closing (:func:`~polm.engine.chat_template.assistant_frame`). Text
    the generation prompt already ends with (DeepSeek-R1-Distill's ``<think>\n``) is not written twice
    when the completion starts with it.
    """
    if getattr(tokenizer, "chat_template", None):
        context = _with_markers(as_messages(prompt))
        prompt_text = render_text(tokenizer, context, add_generation_prompt=True)
        prompt_ids = _tokenize(tokenizer, prompt_text)  # what encode_prompt gives
        frame = assistant_frame(tokenizer, context, prompt_text)
        if frame.prompt_extra and completion.startswith(frame.prompt_extra):
            completion = completion[len(frame.prompt_extra):]
        answer = frame.opening + completion + frame.closing
        full_ids = _tokenize(tokenizer, prompt_text + answer)
        # Tokenized together, the prompt keeps its own ids unless a token joins its end to the answer.
        together = full_ids[: len(prompt_ids)] == prompt_ids
        completion_ids = full_ids[len(prompt_ids):] if together else _tokenize(tokenizer, answer)
    else:
        prompt_ids = encode_prompt(tokenizer, prompt)
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _with_media(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
                       media_parts(prompt))


def encode_chat(tokenizer: Any, messages: list[Row]) -> Encoded:
    """A multi-turn chat with the loss on the assistant turns only (:func:`~polm.engine.chat_template.assistant_spans`),
    cut after the last of them."""
    text, spans = assistant_spans(tokenizer, _with_markers(messages))
    ids, inside = _tokenize_spans(tokenizer, text, spans)
    if not any(inside):
        raise PolmError("a chat row has no assistant message to learn from")
    end = len(inside) - inside[::-1].index(True)
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    labels = [token_id if labelled else IGNORE_INDEX for token_id, labelled in zip(ids, inside)]
    return _with_media(ids[:end], labels[:end], media_parts(messages[: last + 1]))


def encode_row(tokenizer: Any, row: Row) -> Encoded:
    """Encode a row for supervised training, whatever its format."""
    fmt = row_format(row)
    if fmt == "text":
        ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        return Encoded(ids, list(ids))
    if fmt == "chat":
        return encode_chat(tokenizer, row["messages"])
    if fmt == "completion":
        return encode_completion(tokenizer, row["prompt"], row["completion"])
    if fmt == "task":
        return encode_completion(tokenizer, row["prompt"], row["answer"])
    if fmt == "preference":
        return encode_completion(tokenizer, row["prompt"], row["chosen"])
    raise PolmError(f"cannot train on a row with fields {sorted(row)}")


def truncate(example: Encoded, max_length: int) -> Encoded | None:
    """Cut to ``max_length`` tokens; None if no labelled token survives (see :func:`keep_rows_that_fit`)."""
    labels = example.labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    input_ids = example.input_ids[:max_length]
    return Encoded(input_ids, labels, example.media[: sum(token_id < 0 for token_id in input_ids)])


def pad_batch(examples: Sequence[Encoded], pad_token_id: int) -> dict[str, Any]:
    """Right-pad to the longest example.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels`` (B, T)
        with ``-100`` on padding; ``media`` (a :class:`MediaBatch` of B lists)
        when an example has media.
    """
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention_mask[i, :n] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(example.media for example in examples):
        batch["media"] = MediaBatch(example.media for example in examples)
    return batch


def keep_rows_that_fit(owner: str, encoded: Sequence[EncodedRow | None], max_length: int,
                       what: str = "data") -> list[EncodedRow]:
    """The one policy of every stage for rows longer than ``max_length`` tokens.

    A longer row keeps its first ``max_length`` tokens (:func:`truncate`): the prompt and the start of the
    completion. A row left with no completion token (for a pair, on either side) teaches nothing and is
    skipped; one warning counts the skipped rows, and a stage left with none stops with an error.

    Args:
        owner: the stage's name, for messages.
        encoded: each row as the stage encoded it, None where it kept no completion token.
        max_length: the stage's ``max_length``, for messages.
        what: which rows (``"data"``, ``"eval_data"``), for messages.

    Returns:
        The rows that are not None, in order.

    Raises:
        PolmError: no row keeps a completion token.
    """
    kept = [row for row in encoded if row is not None]
    report_rows_that_fit(owner, len(encoded), len(kept), max_length, what)
    return kept


def report_rows_that_fit(owner: str, rows: int, kept: int, max_length: int, what: str = "data") -> None:
    """The messages of :func:`keep_rows_that_fit` for ``kept`` of ``rows`` rows: an error when none is kept,
    one warning counting the skipped ones.

    Raises:
        PolmError: no row keeps a completion token.
    """
    if not kept:
        raise PolmError(f"{owner}: no row of {what} keeps a completion token within max_length={max_length}; "
                        "raise max_length or shorten the prompts")
    if kept < rows:
        get_logger().warning(f"{owner}: {rows - kept} of {rows} rows of {what} keep no "
                             f"completion token within max_length={max_length} and were skipped")
