"""Rows from where users keep them, through Hugging Face ``datasets``: JSON, CSV and parquet files, folders
written by ``save_to_disk``, datasets on the Hub (``openai/gsm8k:main``) and ``datasets.Dataset`` objects.

JSONL files and bundled ``polm:<name>`` datasets are read by :mod:`polm.engine.data` itself (exact line
numbers in errors). Every source gives raw rows and where each came from; :func:`polm.engine.data.load_rows`
renames columns and validates them the same way whatever the source.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polm.engine.errors import PolmError

#: File suffixes read through ``datasets``' builders (``.jsonl`` is read by polm: exact line numbers).
FILE_FORMATS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: ``owner/name`` or ``owner/name:config`` of a dataset on the Hugging Face Hub.
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")

RawRows = Iterator[tuple[dict[str, Any], str]]


def is_dataset(spec: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (checked without importing ``datasets``)."""
    return type(spec).__module__.startswith("datasets.") and hasattr(spec, "column_names")


def is_hub_id(spec: str) -> bool:
    """``spec`` names a Hub dataset: ``owner/name[:config]``, not a data file's name, and no such local path."""
    path = Path(spec.split(":")[0])
    return bool(HUB_ID.match(spec)) and path.suffix not in (*FILE_FORMATS, ".jsonl") and not path.exists()


def describe(spec: Any) -> str:
    """How messages name a source."""
    return "the dataset object" if is_dataset(spec) else str(spec)


def dataset_rows(spec: Any, split: str) -> RawRows:
    """The raw rows of a ``datasets`` source with their origins (``file.csv:3``, ``folder[test] row 4``).

    A file or a single ``Dataset`` has one split, returned whatever ``split`` says; a ``DatasetDict``, a
    ``save_to_disk`` folder of one, or a Hub dataset gives ``split``. CSV fields are read as text, so an
    answer such as ``007`` stays as written.

    Raises:
        PolmError: the source cannot be read (one line, naming it), or it has no such split.
    """
    import datasets

    if is_dataset(spec):
        return _table_rows(_split_of(spec, split, "the dataset object"), "dataset row {}")
    text = str(spec)
    path = Path(text)
    try:
        if path.is_dir():
            return _table_rows(_split_of(datasets.load_from_disk(text), split, text), f"{text}[{split}] row {{}}")
        if path.suffix in FILE_FORMATS:
            kind = FILE_FORMATS[path.suffix]
            table = datasets.load_dataset(kind, data_files=text, split="train",
                                          **(_text_fields(path) if kind == "csv" else {}))
            # A CSV row's line is its index + 2 (the header is line 1), unless a field spans lines.
            return _table_rows(table, f"{text}:{{}}" if kind == "csv" else f"{text} row {{}}",
                               first=2 if kind == "csv" else 0)
        name, _, config = text.partition(":")
        return _table_rows(datasets.load_dataset(name, config or None, split=split), f"{text}[{split}] row {{}}")
    except PolmError:
        raise
    except Exception as error:  # datasets raises many kinds; the user needs one line naming the source
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PolmError(f"{text}: cannot read it with datasets ({type(error).__name__}: {reason})") from None


def _text_fields(path: Path) -> dict[str, Any]:
    """The CSV builder's arguments that read every field of ``path`` as text (empty fields as ``""``)."""
    import csv

    import datasets

    with path.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}), "na_filter": False}


def _split_of(table: Any, split: str, where: str) -> Any:
    """``table`` itself, or its ``split`` where it is a ``DatasetDict``."""
    if not hasattr(table, "keys"):
        return table
    if split not in table:
        raise PolmError(f"{where} has no split '{split}'; it has: {', '.join(table.keys())}")
    return table[split]


def _table_rows(table: Any, origin: str, first: int = 0) -> RawRows:
    """Python rows of an Arrow table, one at a time, without the nulls Arrow writes for fields a row lacks."""
    for index, row in enumerate(table):
        yield _without_nulls(row), origin.format(index + first)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value
