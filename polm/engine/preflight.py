"""What a stage's rows need of the model that reads them, checked before the stage writes anything.

A corrupt image in row 40 000 should stop a run before its first step, not hours into it, and never after
the run has claimed its output folder: :meth:`polm.engine.stage.Stage.check_inputs` walks every row once
with the stage's starting model, and :func:`check_media` is what it asks of each media part.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from polm.engine.data import Row
from polm.engine.errors import PolmError
from polm.engine.media import reads_media

#: The part types that name a file (``{"type": "image", "path": ...}``).
MEDIA_TYPES = ("image", "audio")


def media_files(row: Row) -> Iterator[tuple[str, str]]:
    """``(kind, path)`` of every media part in ``row``, wherever its chats are (``messages``, a ``prompt`` or
    the ``chosen`` / ``rejected`` turns of a pair)."""
    for value in row.values():
        if isinstance(value, list):
            for message in value:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list):
                    yield from ((part["type"], part["path"]) for part in content if part.get("type") in MEDIA_TYPES)


def check_media_exists(rows: Iterable[tuple[Row, str]]) -> None:
    """Fail on the first media part whose file does not exist (needs no model).

    Raises:
        PolmError: ``file:line: image file not found: <path>``.
    """
    for row, where in rows:
        for kind, path in media_files(row):
            if not Path(path).is_file():
                raise PolmError(f"{where}: {kind} file not found: {path}")


def check_media(model: torch.nn.Module, rows: Iterable[tuple[Row, str]]) -> None:
    """Fail unless ``model`` can read every media file of ``rows``: a text-only model none, a multimodal one
    each file through :meth:`~polm.engine.media.MediaModel.check_file` (once per file).

    Raises:
        PolmError: naming the row's ``file:line`` and the file.
    """
    seen: set[tuple[str, str]] = set()
    media_model: Any = getattr(model, "module", model)
    for row, where in rows:
        for kind, path in media_files(row):
            if (kind, path) in seen:
                continue
            seen.add((kind, path))
            if not reads_media(media_model):
                raise PolmError(
                    f"{where}: the row holds {kind} content, which the text-only model {type(media_model).__name__} "
                    "cannot read; start from a multimodal model (an 'align' stage with encoders, or a saved "
                    "multimodal folder)")
            try:
                media_model.check_file(kind, path)
            except PolmError as error:
                raise PolmError(f"{where}: {error}") from None

