"""Encoded training rows kept on disk: each data file is encoded once, into an Arrow table in ``datasets``'
cache, and read back memory-mapped one example at a time.

A run on a million-row file then holds neither the rows nor their token lists in memory. The cache key
(a fingerprint) is the file (its path, size and modification time), the tokenizer (vocabulary, special
tokens, chat template), the options that shape an example (``columns``, ``max_length``) and the source of
polm's encoding code, so a rerun, a ``--resume`` and the other processes of a launch find the table the
first one wrote (``datasets`` locks it while it is written), and any change encodes again. Rows given in
Python (lists, ``datasets.Dataset`` objects) and bundled datasets are encoded in memory, as before.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from polm.engine import chat_template, data, encoding
from polm.engine.data import Row, bundled_name, encode_at, encode_each, iter_rows, load_rows
from polm.engine.encoding import Encoded, keep_rows_that_fit, report_rows_that_fit
from polm.engine.errors import PolmError


class EncodedRows(Sequence[Encoded]):
    """Encoded examples in an Arrow table, each read when it is asked for."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> Encoded:  # type: ignore[override]
        row = self.table[int(index)]
        return Encoded(row["input_ids"], row["labels"], json.loads(row["media"]))


def encoded_rows(owner: str, spec: Any, columns: dict[str, str] | None, tokenizer: Any,
                 encode: Callable[[Row], Encoded | None], max_length: int) -> Sequence[Encoded]:
    """The training rows of ``spec`` encoded by ``encode`` (None for a row that keeps no completion token),
    with :func:`~polm.engine.encoding.keep_rows_that_fit`'s policy: files, folders and Hub datasets through
    the on-disk cache, anything else in memory.

    Raises:
        PolmError: a row fails to encode (naming where it came from), or no row keeps a completion token.
    """
    if not _cached_source(spec):
        return keep_rows_that_fit(owner, encode_each(load_rows(spec, "train", columns), encode), max_length)
    import datasets

    counts = {"rows": 0, "kept": 0}

    def examples() -> Iterator[dict[str, Any]]:
        for row, where in iter_rows(spec, "train", columns):
            counts["rows"] += 1
            example = encode_at(row, where, encode)
            if example is not None:
                counts["kept"] += 1
                yield {"input_ids": example.input_ids, "labels": example.labels, "media": json.dumps(example.media)}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "media": datasets.Value("string")})
    try:
        with _quiet_datasets():
            table = datasets.Dataset.from_generator(
                examples, features=features, fingerprint=_fingerprint(spec, columns, tokenizer, max_length))
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, PolmError):
            raise PolmError(str(error.__cause__)) from None
        raise
    # Counted only when the table was written; served from the cache, only an empty table is reported.
    report_rows_that_fit(owner, counts["rows"] or len(table), len(table), max_length)
    return EncodedRows(table)


def _cached_source(spec: Any) -> bool:
    """A file, a folder or a Hub id: data that may be large and does not change under a run."""
    from polm.engine.sources import is_hub_id

    return isinstance(spec, (str, Path)) and bundled_name(str(spec)) is None and (
        Path(spec).exists() or is_hub_id(str(spec)))


def _fingerprint(spec: Any, columns: dict[str, str] | None, tokenizer: Any, max_length: int) -> str:
    """What an encoded table depends on, hashed: the source, the tokenizer, the options, polm's encoding code."""
    digest = hashlib.sha256()
    for file, (size, modified) in data.file_stamps(spec).items():
        digest.update(f"{file}:{size}:{modified}".encode())
    digest.update(str(spec).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(vocabulary.encode())
    digest.update(json.dumps([str(tokenizer.chat_template), tokenizer.special_tokens_map, tokenizer.eos_token_id],
                             sort_keys=True, default=str).encode())
    digest.update(json.dumps([columns or {}, max_length], sort_keys=True).encode())
    for module in (data, encoding, chat_template):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:32]


class _quiet_datasets:
    """Hide ``datasets``' own progress bar while a table is written (polm reports what matters)."""

    def __enter__(self) -> None:
        import datasets

        self.was_enabled = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        import datasets

        if self.was_enabled:
            datasets.utils.logging.enable_progress_bar()
