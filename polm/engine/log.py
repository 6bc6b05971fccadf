"""polm's logger: ``logging.getLogger("polm")``, one line per warning on standard error through rich; and
polm's progress bar (:func:`progress_bar`).

Every warning polm gives goes through :func:`get_logger` (as transformers' go through its own logger), so
users silence or redirect polm with the standard ``logging`` machinery, for example
``logging.getLogger("polm").setLevel(logging.ERROR)``, and tests read the records with pytest's ``caplog``.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOGGER_NAME = "polm"


def get_logger() -> logging.Logger:
    """The ``polm`` logger, with its rich handler on standard error (added on first use, once)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, RichHandler) for handler in logger.handlers):
        # Console(stderr=True) looks sys.stderr up at each write, so captured streams (pytest) receive it.
        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def progress_bar(name: str, enabled: bool, *columns: ProgressColumn) -> Progress:
    """polm's progress bar for long work: ``name``, the bar, done of total, ``columns`` (a task's own figures),
    time elapsed and remaining; drawn only when ``enabled`` (the main process, a command that shows progress)."""
    return Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), *columns, TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)
