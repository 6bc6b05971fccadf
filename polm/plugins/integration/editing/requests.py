"""Edit requests: ``{"prompt", "subject", "target"}`` rows, read and checked before any model loads.

A request asks that ``prompt`` (which names ``subject``) be completed by ``target``::

    {"prompt": "The capital of Velmor is", "subject": "Velmor", "target": "Ostrak",
     "paraphrases": ["Velmor's capital is"],                                   # optional, scored only
     "neighbourhood": [{"prompt": "The capital of Dounai is", "target": "Brask"}]}  # optional, scored only

``paraphrases`` are other prompts that should now be completed by ``target`` too, and ``neighbourhood`` holds
prompts about other subjects whose answers must not change. Neither is used to make the edit. Requests come
from a JSONL file (errors name ``file:line``), a bundled ``polm:<name>`` set's split, or a list of rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polm.engine.data import bundled_name
from polm.engine.errors import PolmError


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into a model.

    Attributes:
        prompt: the text the model completes; it contains ``subject``.
        subject: the entity whose last token's MLP key the edit is keyed on.
        target: the new completion of ``prompt``.
        paraphrases: other prompts that should be completed by ``target`` (scored, never trained on).
        neighbourhood: ``(prompt, target)`` pairs about other subjects, whose completions must not change.
        where: where the row came from (``edits.jsonl:3``), for messages.
    """

    prompt: str
    subject: str
    target: str
    paraphrases: tuple[str, ...] = ()
    neighbourhood: tuple[tuple[str, str], ...] = ()
    where: str = field(default="", compare=False)


def _raw_rows(spec: Any, split: str) -> Iterator[tuple[Any, str]]:
    """Each raw row of ``spec`` with where it came from."""
    if isinstance(spec, (list, tuple)):
        yield from ((row, f"row {index}") for index, row in enumerate(spec))
        return
    if not isinstance(spec, (str, Path)):
        raise PolmError(f"requests must be 'polm:<name>', a .jsonl file or a list of rows; got {type(spec).__name__}")
    text = str(spec)
    name = bundled_name(text)
    if name is not None:
        from polm.engine.plugins import registry

        dataset = registry("datasets").get(name)
        if split not in dataset.splits:
            raise PolmError(f"dataset '{text}' has no split '{split}'; it has: {', '.join(dataset.splits)}")
        yield from ((row, f"{text}[{split}] row {index}") for index, row in enumerate(dataset.build(split)))
        return
    path = Path(text)
    if path.suffix != ".jsonl":
        raise PolmError(f"requests file {text}: expected a .jsonl file of {{prompt, subject, target}} rows")
    if not path.is_file():
        raise PolmError(f"requests file not found: {text}")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}:{number}"
            except json.JSONDecodeError as error:
                raise PolmError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise PolmError(f"{where}: an edit request needs '{key}'; it has {', '.join(sorted(row)) or 'no fields'}")
    if not isinstance(value, str) or not value.strip():
        raise PolmError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
    return value


def validate_request(row: Any, where: str) -> EditRequest:
    """One request row checked: strings where strings belong, and the subject inside the prompt.

    Raises:
        PolmError: naming ``where`` and the field.
    """
    if not isinstance(row, dict):
        raise PolmError(f"{where}: expected a JSON object per request, got {type(row).__name__}")
    prompt, subject, target = (_text(row, key, where) for key in ("prompt", "subject", "target"))
    if subject not in prompt:
        raise PolmError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}")
    paraphrases = row.get("paraphrases", [])
    if not isinstance(paraphrases, list) or not all(isinstance(p, str) and p.strip() for p in paraphrases):
        raise PolmError(f"{where}: field 'paraphrases' must be a list of non-empty strings")
    neighbours = row.get("neighbourhood", [])
    if not isinstance(neighbours, list):
        raise PolmError(f"{where}: field 'neighbourhood' must be a list of {{prompt, target}} objects")
    pairs = []
    for index, neighbour in enumerate(neighbours):
        if not isinstance(neighbour, dict):
            raise PolmError(f"{where}: field 'neighbourhood[{index}]' must be a {{prompt, target}} object")
        pairs.append(tuple(_text(neighbour, key, f"{where}: neighbourhood[{index}]") for key in ("prompt", "target")))
    return EditRequest(prompt, subject, target, tuple(paraphrases), tuple(pairs), where)


def load_requests(spec: Any, split: str = "edits") -> list[EditRequest]:
    """The requests of ``spec``: a ``.jsonl`` file, ``polm:<name>`` (its ``split``), or a list of rows (dicts or
    :class:`EditRequest`).

    Raises:
        PolmError: the source cannot be read, has no rows, or a row is malformed (naming its ``file:line``).
    """
    requests = [row if isinstance(row, EditRequest) else validate_request(row, where)
                for row, where in _raw_rows(spec, split)]
    if not requests:
        raise PolmError(f"{spec if isinstance(spec, (str, Path)) else 'requests'}: there are no edit requests")
    return requests

