"""Rows, datasets and their validation.

A dataset is a list of rows (dicts). polm reads JSONL files and bundled
datasets referenced as ``polm:<name>``. The row formats, told apart by their
keys:

=================  ==========================================  ======================
format             keys                                        used by
=================  ==========================================  ======================
``text``           ``text``                                    language modelling
``completion``     ``prompt``, ``completion``                  SFT
``chat``           ``messages``: ``[{role, content}, ...]``     SFT (assistant turns)
``preference``     ``prompt``, ``chosen``, ``rejected``        DPO, reward models
``task``           ``prompt``, ``answer``                      evaluation, RL, SFT
``steps``          ``prompt``, ``steps``, ``labels``           process reward models
=================  ==========================================  ======================

A ``steps`` row labels each step of a solution right (1) or wrong (0); an optional ``completion`` holds the
solution text with the steps in order (by default they are joined by the stage's separator).

A message's ``content`` is a string, or a list of parts
(``{"type": "text", "text": ...}``, ``{"type": "image", "path": ...}``,
``{"type": "audio", "path": ...}``) so that one chat row can hold images and
sound; relative paths are resolved against the JSONL file's folder. A
``prompt`` may be a string or a list of messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from polm.engine.errors import PolmError

Row = dict[str, Any]
ROW_FORMATS: tuple[str, ...] = ("text", "completion", "chat", "preference", "task", "steps")
ROLES = ("system", "user", "assistant")
PART_TYPES = {"text": "text", "image": "path", "audio": "path"}
BUNDLED_PREFIX = "polm:"
Encoded = TypeVar("Encoded")


class Rows(list):
    """Validated rows that remember where each came from (``file.jsonl:12``, ``polm:arithmetic[train] row 3``),
    so that an error found later, when a row is encoded, can name it."""

    def __init__(self, rows: Iterable[Row] = (), origins: Sequence[str] | None = None) -> None:
        super().__init__(rows)
        self.origins = list(origins) if origins is not None else [f"row {index}" for index in range(len(self))]

    def __getitem__(self, index):  # a slice keeps its rows' origins
        if isinstance(index, slice):
            return Rows(super().__getitem__(index), self.origins[index])
        return super().__getitem__(index)

    def where(self, index: int) -> str:
        """Where row ``index`` came from."""
        return self.origins[index]


def encode_each(rows: Sequence[Row], encode: Callable[[Row], Encoded]) -> list[Encoded]:
    """``encode`` applied to every row, in order; an error names the row (:meth:`Rows.where`).

    Raises:
        PolmError: ``encode`` failed on a row; the message starts with where the row came from.
    """
    return [encode_at(row, rows.where(index) if isinstance(rows, Rows) else f"row {index}", encode)
            for index, row in enumerate(rows)]


def encode_at(row: Row, where: str, encode: Callable[[Row], Encoded]) -> Encoded:
    """``encode(row)``; an error starts with ``where`` the row came from.

    Raises:
        PolmError: ``encode`` failed on the row.
    """
    try:
        return encode(row)
    except PolmError as error:
        raise PolmError(f"{where}: {error}") from None


@dataclass
class BundledDataset:
    """A dataset made or shipped by a plugin, referenced as ``polm:<name>``.

    Args:
        build: ``build(split) -> rows``; must be deterministic.
        splits: the split names ``build`` accepts.
        description: one line for ``polm plugins``.
    """

    build: Callable[[str], list[Row]]
    splits: tuple[str, ...] = ("train", "test")
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def row_format(row: Row) -> str:
    """The format of ``row`` (see the module docstring); ``""`` if none matches."""
    if "messages" in row:
        return "chat"
    if "prompt" in row:
        if "chosen" in row and "rejected" in row:
            return "preference"
        if "steps" in row and "labels" in row:  # before completion: a steps row may hold its solution text
            return "steps"
        if "completion" in row:
            return "completion"
        if "answer" in row:
            return "task"
    if "text" in row:
        return "text"
    return ""


def file_stamps(spec: Any) -> dict[str, list[int]]:
    """Each local file a data spec reads (a JSONL file, or every file under a folder) with its size and
    modification time in nanoseconds: enough to tell that a file changed without reading it. Empty for
    bundled datasets, Hub ids and in-memory rows."""
    if not isinstance(spec, (str, Path)) or str(spec).startswith(BUNDLED_PREFIX):
        return {}
    path = Path(spec)
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    return {str(file.resolve()): [file.stat().st_size, file.stat().st_mtime_ns] for file in files if file.is_file()}


def validate_row(row: Any, where: str, base_dir: Path | None = None) -> Row:
    """Check one row's fields and types; resolve relative media paths.

    Raises:
        PolmError: naming ``where`` (``file:line``) and the offending field.
    """
    if not isinstance(row, dict):
        raise PolmError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    fmt = row_format(row)
    if not fmt:
        raise PolmError(
            f"{where}: cannot tell the row format from its fields {sorted(row)}; expected one of "
            "{text} | {prompt, completion} | {messages} | {prompt, chosen, rejected} | {prompt, answer} | "
            "{prompt, steps, labels}"
        )
    row = dict(row)
    if fmt == "chat":
        row["messages"] = _validate_messages(row["messages"], "messages", where, base_dir)
    elif fmt == "text":
        _expect_str(row["text"], "text", where)
    else:
        if isinstance(row["prompt"], list):
            row["prompt"] = _validate_messages(row["prompt"], "prompt", where, base_dir)
        else:
            _expect_str(row["prompt"], "prompt", where)
        if fmt == "steps":
            _validate_steps(row, where)
            return row
        for key in {"completion": ("completion",), "preference": ("chosen", "rejected"), "task": ("answer",)}[fmt]:
            if fmt == "task" and isinstance(row[key], (int, float)) and not isinstance(row[key], bool):
                row[key] = str(row[key])
            _expect_str(row[key], key, where)
    return row


def _validate_steps(row: Row, where: str) -> None:
    steps, labels = row["steps"], row["labels"]
    if not isinstance(steps, list) or not steps or not all(isinstance(step, str) for step in steps):
        raise PolmError(f"{where}: field 'steps' must be a non-empty list of strings")
    if not isinstance(labels, list) or len(labels) != len(steps) or any(label not in (0, 1) for label in labels):
        raise PolmError(f"{where}: field 'labels' must hold one 0 or 1 per step; got {labels!r} for "
                        f"{len(steps)} step{'s' * (len(steps) != 1)}")
    if "completion" in row:
        _expect_str(row["completion"], "completion", where)


def _expect_str(value: Any, name: str, where: str) -> None:
    if not isinstance(value, str):
        raise PolmError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")


def _validate_messages(messages: Any, name: str, where: str, base_dir: Path | None) -> list[Row]:
    if not isinstance(messages, list) or not messages:
        raise PolmError(f"{where}: field '{name}' must be a non-empty list of {{role, content}} objects")
    checked = []
    for index, message in enumerate(messages):
        field_name = f"{name}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PolmError(f"{where}: field '{field_name}' must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise PolmError(
                f"{where}: field '{field_name}.role' is {message['role']!r}; expected one of {', '.join(ROLES)}"
            )
        content = message["content"]
        if isinstance(content, list):
            content = [_validate_part(part, f"{field_name}.content[{i}]", where, base_dir) for i, part in enumerate(content)]
        else:
            _expect_str(content, f"{field_name}.content", where)
        checked.append({**message, "content": content})
    return checked


def _validate_part(part: Any, name: str, where: str, base_dir: Path | None) -> Row:
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        raise PolmError(f"{where}: field '{name}' must be an object with 'type' in {', '.join(PART_TYPES)}")
    key = PART_TYPES[part["type"]]
    _expect_str(part.get(key), f"{name}.{key}", where)
    if key == "path" and base_dir is not None and not Path(part["path"]).is_absolute():
        part = {**part, "path": str(base_dir / part["path"])}
    return part


def read_jsonl(path: str | Path, columns: dict[str, str] | None = None) -> Rows:
    """Read and validate a JSONL file, its columns renamed by ``columns`` first (see :func:`load_rows`).

    Raises:
        PolmError: for a missing file, bad JSON or a malformed row, naming the
            file, the line number and the field.
    """
    return _collected(iter_rows(path, columns=columns))


def _jsonl_lines(path: Path) -> Iterator[tuple[Any, str]]:
    """Each parsed line of a JSONL file with its ``file:line``, one at a time."""
    if not path.is_file():
        raise PolmError(f"data file not found: {path}")
    empty = True
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise PolmError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as error:
                raise PolmError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            empty = False
    if empty:
        raise PolmError(f"{path}: the file has no rows")


def _validated(raw: Iterable[tuple[Any, str]], columns: dict[str, str] | None,
               base_dir: Path | None = None) -> Iterator[tuple[Row, str]]:
    """Each raw row with its columns renamed (``{source: field}``) and validated, each error naming its origin."""
    for index, (row, where) in enumerate(raw):
        if columns and isinstance(row, dict):
            if index == 0:
                missing = [source for source in columns if source not in row]
                if missing:
                    raise PolmError(f"option 'columns': {where} has no column {', '.join(map(repr, missing))}; "
                                    f"its columns are: {', '.join(sorted(row)) or 'none'}")
            row = {columns.get(key, key): value for key, value in row.items()}
        yield validate_row(row, where, base_dir), where


def _collected(rows: Iterable[tuple[Row, str]]) -> Rows:
    pairs = list(rows)
    return Rows((row for row, _ in pairs), [where for _, where in pairs])


def bundled_name(spec: str) -> str | None:
    """``"arithmetic"`` for ``"polm:arithmetic"``; None for anything else."""
    return spec[len(BUNDLED_PREFIX):] if spec.startswith(BUNDLED_PREFIX) else None


def check_data_spec(spec: Any, option: str) -> None:
    """Fail early (before any training) if a ``data`` option cannot be loaded: a bundled name that is not
    registered, or a path that does not exist. A Hub id is checked when it is loaded (that needs the network)."""
    from polm.engine.sources import FILE_FORMATS, is_dataset, is_hub_id

    if isinstance(spec, (list, tuple)) or is_dataset(spec):
        return
    if not isinstance(spec, (str, Path)):
        raise PolmError(f"option '{option}' must be 'polm:<name>', a file ({', '.join(('.jsonl', *FILE_FORMATS))}), "
                        f"a save_to_disk folder, a Hub id or a list of rows; got {type(spec).__name__}")
    spec = str(spec)
    name = bundled_name(spec)
    if name is not None:
        from polm.engine.plugins import registry

        registry("datasets").get(name)
    elif not Path(spec).exists() and not is_hub_id(spec):
        raise PolmError(f"option '{option}': data file not found: {spec}")


def iter_rows(spec: Any, split: str = "train", columns: dict[str, str] | None = None) -> Iterator[tuple[Row, str]]:
    """The validated rows of ``spec`` with where each came from, one at a time: a large file is never held
    whole. Takes what :func:`load_rows` takes."""
    from polm.engine.sources import dataset_rows, is_dataset

    if isinstance(spec, (list, tuple)):
        yield from _validated(((row, f"row {i}") for i, row in enumerate(spec)), columns)
        return
    if is_dataset(spec):
        yield from _validated(dataset_rows(spec, split), columns)
        return
    spec = str(spec)
    name = bundled_name(spec)
    if name is not None:
        from polm.engine.plugins import registry

        dataset: BundledDataset = registry("datasets").get(name)
        if split not in dataset.splits:
            raise PolmError(f"dataset '{spec}' has no split '{split}'; it has: {', '.join(dataset.splits)}")
        rows = dataset.build(split)
        yield from _validated(((row, f"{spec}[{split}] row {i}") for i, row in enumerate(rows)), columns)
        return
    path = Path(spec)
    if spec.endswith(".jsonl"):
        yield from _validated(_jsonl_lines(path), columns, base_dir=path.parent)
        return
    if not path.exists() and path.suffix:
        raise PolmError(f"data file not found: {spec}")
    yield from _validated(dataset_rows(spec, split), columns, base_dir=path.parent if path.is_file() else None)


def load_rows(spec: Any, split: str = "train", columns: dict[str, str] | None = None) -> Rows:
    """Validated rows from any source a stage's ``data`` may name.

    Args:
        spec: a bundled dataset (``polm:<name>``); a JSONL, JSON, CSV or parquet file; a folder written by
            ``datasets``' ``save_to_disk``; a Hugging Face Hub dataset (``owner/name`` or
            ``owner/name:config``); a ``datasets.Dataset`` / ``DatasetDict``; or a list of rows.
        split: the split of a bundled dataset, a ``DatasetDict`` or a Hub dataset; a file, a list and a single
            ``Dataset`` have one split, returned whatever ``split`` says.
        columns: renames the source's columns to polm's fields before validation, ``{"question": "prompt"}``;
            the other columns are kept (rewards see them).

    Raises:
        PolmError: naming the source, and for a malformed row where it came from (``file:line``) and the field;
            or the source has no rows.
    """
    rows = _collected(iter_rows(spec, split, columns))
    if not rows and not isinstance(spec, (list, tuple)):
        raise PolmError(f"{spec if isinstance(spec, (str, Path)) else 'the dataset object'}: the data has no rows")
    return rows
