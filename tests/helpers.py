"""What several test modules share that is not a fixture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import polm
from polm.engine.encoding import IGNORE_INDEX, Encoded


@contextmanager
def registered(plugin: object, name: str) -> Iterator[object]:
    """``plugin`` registered under ``name`` for the duration of the block, the way a user adds one at runtime."""
    manager = polm.plugin_manager()
    manager.register(plugin, name=name)
    try:
        yield plugin
    finally:
        manager.unregister(name=name)


def labelled_spans(tokenizer, example: Encoded) -> list[str]:
    """The decoded runs of consecutive labelled tokens, in order."""
    spans: list[list[int]] = []
    previous_labelled = False
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token, "a label differs from its input id"
            if not previous_labelled:
                spans.append([])
            spans[-1].append(token)
        previous_labelled = label != IGNORE_INDEX
    return [tokenizer.decode(span) for span in spans]
