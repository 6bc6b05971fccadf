"""Silencing transformers' own progress bars, which would break polm's rich display."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as transformers_logging


@contextmanager
def no_transformers_progress() -> Iterator[None]:
    """Hide the per-shard bars of ``from_pretrained`` / ``save_pretrained`` inside the block."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
