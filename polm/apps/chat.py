"""Chat turns: user messages with image and audio parts, and replies streamed from one or more models.

Messages use polm's chat row format (see :mod:`polm.engine.data`): ``content``
is a string or a list of parts ``{"type": "text", "text": ...}``,
``{"type": "image", "path": ...}``, ``{"type": "audio", "path": ...}``.
Gradio's Chatbot shows such a list as it is (a part with a ``path`` is shown
as the file), so the app displays exactly what the model is given.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from polm.engine.data import Row
from polm.engine.encoding import encode_prompt
from polm.engine.errors import PolmError
from polm.engine.evaluation import generate
from polm.engine.rl.rollout import stop_token_ids

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".webm")


@dataclass
class GenerationSettings:
    """How replies are sampled; ``temperature`` 0 decodes greedily."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise PolmError(f"temperature must not be negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise PolmError(f"top-p must be in (0, 1], got {self.top_p}")
        self.max_new_tokens = int(self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise PolmError(f"max tokens must be at least 1, got {self.max_new_tokens}")

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for these settings."""
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": False}


def media_part(path: str) -> Row:
    """An ``image`` or ``audio`` content part for an uploaded or recorded file.

    Raises:
        PolmError: the file's type is neither an image nor audio that the app accepts.
    """
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return {"type": "image", "path": path}
    if suffix in AUDIO_SUFFIXES:
        return {"type": "audio", "path": path}
    raise PolmError(f"'{Path(path).name}' is neither an image ({', '.join(IMAGE_SUFFIXES)}) "
                    f"nor audio ({', '.join(AUDIO_SUFFIXES)})")


def user_message(text: str, files: Sequence[str] = ()) -> Row:
    """The user's turn: plain text, or content parts when files are attached.

    Raises:
        PolmError: an empty message, or a file of an unsupported type.
    """
    text = (text or "").strip()
    if not text and not files:
        raise PolmError("type a message or attach an image or audio clip")
    if not files:
        return {"role": "user", "content": text}
    parts = [media_part(str(path)) for path in files]
    return {"role": "user", "content": ([{"type": "text", "text": text}] if text else []) + parts}


def has_media(messages: Sequence[Row]) -> bool:
    """Whether any message holds a part other than text."""
    return any(isinstance(message["content"], list) and any(part["type"] != "text" for part in message["content"])
               for message in messages)


def stream_reply(model: torch.nn.Module, tokenizer: Any, messages: list[Row],
                 settings: GenerationSettings) -> Iterator[str]:
    """The assistant's reply to ``messages``, yielded as it grows (each item is the text so far).

    Text-only chats are streamed token by token. A chat with images or audio
    goes through :func:`polm.generate`, which feeds those parts to a
    multimodal model's encoders and refuses them, by name, for a text-only
    model; its reply arrives in one piece.

    Raises:
        PolmError: the model cannot read the chat (media for a text-only model, no chat template).
    """
    if has_media(messages):
        yield generate(model, tokenizer, [messages], max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, top_p=settings.top_p)[0]
        return
    device = next(model.parameters()).device
    input_ids = torch.tensor([encode_prompt(tokenizer, messages)], device=device)  # (1, P)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stops = stop_token_ids(model, tokenizer)
    cancelled = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=settings.max_new_tokens, eos_token_id=stops,
                               pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_WhenSet(cancelled)]), **settings.sampling())
        except Exception as error:  # re-raised below, in the caller's thread
            failures.append(error)
            streamer.end()

    thread = threading.Thread(target=run, name="polm-app-generate", daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        # Also when the page goes away mid-reply (the generator is closed): stop sampling at the next token,
        # so that no generation outlives its chat (or the server).
        cancelled.set()
        thread.join()
    if failures:
        raise failures[0]
    yield text


class _WhenSet(StoppingCriteria):
    """A stopping criterion for ``model.generate``: stop every row once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


_FINISHED = object()


def stream_together(streams: Sequence[Iterator[str]]) -> Iterator[list[str]]:
    """Run several reply streams at once; yield every stream's latest text whenever one grows.

    Closing this generator (or an error in one stream) closes every stream at its next item.

    Raises:
        Exception: the first error any stream raised.
    """
    texts = [""] * len(streams)
    updates: queue.Queue[tuple[int, Any]] = queue.Queue()
    abandoned = threading.Event()

    def drain(index: int, stream: Iterator[str]) -> None:
        try:
            for text in stream:
                if abandoned.is_set():
                    stream.close()
                    break
                updates.put((index, text))
        except Exception as error:
            updates.put((index, error))
        updates.put((index, _FINISHED))

    for index, stream in enumerate(streams):
        threading.Thread(target=drain, args=(index, stream), name=f"polm-app-stream-{index}", daemon=True).start()
    running = len(streams)
    try:
        while running:
            index, item = updates.get()
            if item is _FINISHED:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                texts[index] = item
                yield list(texts)
    finally:
        abandoned.set()
