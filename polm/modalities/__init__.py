"""Modalities: text (the embedded default model and tasks), with vision and audio to come.

This package is a built-in plugin: it registers the ``polm-tiny`` model and
the bundled datasets ``polm:arithmetic`` and ``polm:arithmetic-prefs``.
"""

from __future__ import annotations

from functools import partial

from polm.engine.data import BundledDataset
from polm.engine.hookspecs import Register, hookimpl


@hookimpl
def polm_register_models(register: Register) -> None:
    from polm.modalities.text.tiny import load_tiny

    register("polm-tiny", load_tiny, description="embedded ~3M-parameter Llama-style base model, offline")


@hookimpl
def polm_register_datasets(register: Register) -> None:
    from polm.modalities.text.tasks.arithmetic import arithmetic_preference_rows, arithmetic_rows

    register(
        "arithmetic",
        BundledDataset(partial(arithmetic_rows), description="arithmetic questions with exact answers, levels 1-4"),
    )
    register(
        "arithmetic-prefs",
        BundledDataset(partial(arithmetic_preference_rows),
                       description="preference pairs: the correct answer over a plausible wrong one"),
    )
