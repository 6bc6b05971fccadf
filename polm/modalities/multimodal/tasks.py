"""Bundled synthetic tasks with media: generated on first use into a cache folder, deterministic by seed."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from polm.engine.data import Row

CACHE_ENV = "POLM_CACHE_DIR"
ROWS_FILE = "rows.jsonl"


def cache_dir() -> Path:
    """Where generated media live: ``$POLM_CACHE_DIR``, else ``~/.cache/polm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "polm")


def image_question(path: Path, question: str) -> list[Row]:
    """A one-message prompt: the image, then the question."""
    return [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": question}]}]


def audio_question(path: Path, question: str) -> list[Row]:
    """A one-message prompt: the question, then the clip."""
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "audio", "path": str(path)}]}]


def generated_rows(name: str, split: str, seed: int, size: int,
                   make: Callable[[np.random.Generator, Path, int], list[Row]]) -> list[Row]:
    """The rows of one split, made by ``make(rng, folder, size)`` the first time and read back afterwards.

    The folder is written under a temporary name and renamed when complete, so
    concurrent first uses neither see half a dataset nor clash.
    """
    folder = cache_dir() / f"{name}-seed{seed}-n{size}" / split
    if not (folder / ROWS_FILE).is_file():
        temporary = folder.with_name(f".{split}.{uuid.uuid4().hex}")
        temporary.mkdir(parents=True)
        split_seed = seed * 1000 + {"train": 1, "test": 2}.get(split, 3)
        rows = make(np.random.default_rng(split_seed), temporary, size)
        text = "".join(json.dumps(row) + "\n" for row in rows).replace(str(temporary), str(folder))
        (temporary / ROWS_FILE).write_text(text)
        try:
            os.replace(temporary, folder)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(temporary, ignore_errors=True)
    return [json.loads(line) for line in (folder / ROWS_FILE).read_text().splitlines()]
