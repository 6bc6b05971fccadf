"""What several test modules share that is not a fixture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import polm


@contextmanager
def registered(plugin: object, name: str) -> Iterator[object]:
    """``plugin`` registered under ``name`` for the duration of the block, the way a user adds one at runtime."""
    manager = polm.plugin_manager()
    manager.register(plugin, name=name)
    try:
        yield plugin
    finally:
        manager.unregister(name=name)
