"""Chat templates as they are: rendering a conversation and finding what the assistant says in it.

Many public templates do not render a conversation as an extension of its own beginning. Qwen3 drops
the empty ``<think>`` block of earlier assistant turns once a later user turn exists; Phi-3 ends a
conversation with the end-of-sequence token only when no generation prompt follows; DeepSeek-R1-Distill's
generation prompt ends in ``<think>\\n`` while its assistant turns do not start with it; Mistral v0.3
writes the system text into the last user turn only. So polm does not compare renderings of growing
prefixes. It renders the whole conversation once, and once more with each assistant message replaced
by a sentinel, to find where the template puts each assistant message; what the template writes
around one assistant turn (its opening, such as Qwen3's ``<think>\\n\\n</think>\\n\\n``, and its closing,
the end-of-turn tokens) comes from rendering that turn alone after its context.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import jinja2

from polm.engine.data import Row
from polm.engine.errors import PolmError

#: Stands for one assistant message's content; no template strips or rewrites it (no spaces, no tags).
_SENTINEL = "POLMASSISTANTMESSAGE{}END"


def template_owner(tokenizer: Any) -> str:
    """The tokenizer's folder or class name, for messages."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def render_text(tokenizer: Any, messages: list[Row], add_generation_prompt: bool) -> str:
    """``messages`` (string contents) rendered by the tokenizer's chat template.

    Raises:
        PolmError: the tokenizer has no chat template, or the template refuses the conversation (Gemma 2
            refuses a system message); the message quotes the template's own words.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PolmError(
            f"tokenizer '{template_owner(tokenizer)}' has no chat template, so chat rows cannot be rendered; "
            "set tokenizer.chat_template or use {prompt, completion} rows"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        roles = "/".join(message["role"] for message in messages)
        raise PolmError(f"the chat template of '{template_owner(tokenizer)}' refuses this conversation "
                        f"({roles}): {error}") from None


@dataclass(frozen=True)
class AssistantFrame:
    """What a template writes around one assistant message's content, after a given context.

    ``prompt_extra`` is text the generation prompt writes that the rendered assistant turn lacks
    (DeepSeek-R1-Distill's ``<think>\\n``); ``opening`` is the text between the generation prompt and the
    content (Qwen3's empty think block on the last turn); ``closing`` follows the content (``<|im_end|>\\n``).
    """

    prompt_extra: str
    opening: str
    closing: str


def assistant_frame(tokenizer: Any, context: list[Row], prompt: str | None = None) -> AssistantFrame:
    """The :class:`AssistantFrame` of an assistant message that follows ``context`` (string contents);
    ``prompt`` is ``context`` rendered with its generation prompt, where the caller has it already.

    The turn is rendered with a sentinel for its content. Its opening is what follows, in that rendering,
    the last occurrence of the generation prompt's own text (its header, ``<|im_start|>assistant\n``; for a
    template whose generation prompt adds nothing, as Mistral's, the prompt's last token, ``[/INST]``).
    Where the rendering ends with only the beginning of that header (DeepSeek-R1-Distill's ``<｜Assistant｜>``
    for ``<｜Assistant｜><think>\n``), the rest is the prompt's extra text.

    Raises:
        PolmError: the template drops the assistant message's content.
    """
    sentinel = _SENTINEL.format(len(context))
    turn = render_text(tokenizer, [*context, {"role": "assistant", "content": sentinel}], add_generation_prompt=False)
    if sentinel not in turn:
        raise PolmError(f"the chat template of '{template_owner(tokenizer)}' does not render the content of an "
                        "assistant message, so there is nothing to learn from")
    before, closing = turn.split(sentinel, 1)
    if not context:
        return AssistantFrame("", "", closing)
    if prompt is None:
        prompt = render_text(tokenizer, context, add_generation_prompt=True)
    header = prompt[len(os.path.commonprefix([prompt, render_text(tokenizer, context, add_generation_prompt=False)])):]
    anchor = header or next(iter(_atoms(tokenizer, prompt)[-1:]), "")
    at = before.rfind(anchor) if anchor else -1
    if at >= 0:
        return AssistantFrame("", before[at + len(anchor):], closing)
    for cut in range(len(anchor) - 1, 0, -1):
        if before.endswith(anchor[:cut]):
            return AssistantFrame(anchor[cut:], "", closing)
    return AssistantFrame("", "", closing)


def assistant_spans(tokenizer: Any, messages: list[Row]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A span covers the content as the template rendered it (trimmed, where the template trims), the
    frame's opening where the template wrote it there, and as much of the frame's closing as follows,
    in whole special tokens (Phi-3 closes its last turn with ``<|end|>\\n<|endoftext|>``, earlier ones
    with ``<|end|>\\n``).

    Raises:
        PolmError: the template rewrites an assistant message's content (so its tokens cannot be found),
            or refuses the conversation.
    """
    text = render_text(tokenizer, messages, add_generation_prompt=False)
    marked = [{**message, "content": _SENTINEL.format(index)} if message["role"] == "assistant" else message
              for index, message in enumerate(messages)]
    skeleton = render_text(tokenizer, marked, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    rebuilt, cursor = "", 0  # ``text`` rebuilt from ``skeleton`` up to ``cursor``
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        at = skeleton.find(marked[index]["content"], cursor)
        rebuilt += skeleton[cursor:at]
        content = _rendered_content(message["content"], text, len(rebuilt)) if at >= 0 else None
        if content is None:
            raise _rewrites(tokenizer, index)
        start, end = len(rebuilt), len(rebuilt) + len(content)
        rebuilt += content
        cursor = at + len(marked[index]["content"])
        frame = assistant_frame(tokenizer, marked[:index])
        if frame.opening and text[max(start - len(frame.opening), 0):start] == frame.opening:
            start -= len(frame.opening)
        for atom in _atoms(tokenizer, frame.closing):
            if not text.startswith(atom, end):
                break
            end += len(atom)
        spans.append((start, end))
    if rebuilt + skeleton[cursor:] != text:
        raise _rewrites(tokenizer, None)
    return text, spans


def _rendered_content(content: str, text: str, at: int) -> str | None:
    """``content`` as the template wrote it at ``at`` of ``text``: as given, or trimmed; None if neither."""
    for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
        if text.startswith(candidate, at):
            return candidate
    return None


def _rewrites(tokenizer: Any, index: int | None) -> PolmError:
    which = f"message {index}" if index is not None else "a message"
    return PolmError(
        f"the chat template of '{template_owner(tokenizer)}' rewrites the content of {which} of this chat "
        "(beyond trimming it), so the assistant tokens cannot be located; give the content as the template "
        "renders it, or use {prompt, completion} rows")


def _atoms(tokenizer: Any, text: str) -> list[str]:
    """``text`` cut into its added tokens (``<|im_end|>``, ``</s>``) and the plain text between them."""
    added = sorted(getattr(tokenizer, "get_added_vocab", dict)(), key=len, reverse=True)
    if not added:
        return [text] if text else []
    return [piece for piece in re.split("(" + "|".join(map(re.escape, added)) + ")", text) if piece]
