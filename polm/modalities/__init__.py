"""Modalities: text (the embedded default model and tasks), vision and audio.

This package is a built-in plugin: it registers the ``polm-tiny`` model, the
encoders ``open_clip:<architecture>`` and ``whisper:<size>``, and the bundled
datasets ``polm:arithmetic``, ``polm:arithmetic-worked``, ``polm:arithmetic-paths``,
``polm:arithmetic-prefs``, ``polm:arithmetic-think``, ``polm:arithmetic-steps``, ``polm:facts``, ``polm:shapes``
and ``polm:tones``; and it loads saved multimodal models (``polm_load_model``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from polm.engine.data import BundledDataset
from polm.engine.hookspecs import Register, hookimpl


@hookimpl
def polm_register_models(register: Register) -> None:
    from polm.modalities.text.tiny import load_tiny

    register("polm-tiny", load_tiny, description="embedded ~3M-parameter Llama-style base model, offline")


@hookimpl
def polm_load_model(path: Path, tokenizer: Any) -> tuple[Any, Any] | None:
    """A saved multimodal model (a language model joined to encoders in one folder); other folders are not ours."""
    from polm.modalities.multimodal.build import is_multimodal_folder, load_multimodal

    return load_multimodal(path, tokenizer) if is_multimodal_folder(path) else None


@hookimpl
def polm_register_encoders(register: Register) -> None:
    from polm.modalities.audio.whisper_encoder import whisper_encoder
    from polm.modalities.vision.open_clip_encoder import open_clip_encoder

    register("open_clip", open_clip_encoder,
             description="image: open_clip:<architecture> (pretrained tag or file option; polm-tiny-vit for tests)")
    register("whisper", whisper_encoder,
             description="audio: whisper:<size> or whisper:<checkpoint.pt> (polm-tiny for tests), 16 kHz log-mel")


@hookimpl
def polm_register_datasets(register: Register) -> None:
    from polm.modalities.audio.tones import tones_caption_rows, tones_rows
    from polm.modalities.text.tasks.arithmetic import (
        arithmetic_paths_rows,
        arithmetic_preference_rows,
        arithmetic_rows,
        arithmetic_worked_rows,
    )
    from polm.modalities.vision.shapes import shapes_caption_rows, shapes_rows

    register(
        "arithmetic",
        BundledDataset(partial(arithmetic_rows), description="arithmetic questions with exact answers, levels 1-4"),
    )
    register(
        "arithmetic-worked",
        BundledDataset(partial(arithmetic_worked_rows),
                       description="polm:arithmetic's questions with <think> steps </think><answer> solutions"),
    )
    register(
        "arithmetic-paths",
        BundledDataset(partial(arithmetic_paths_rows),
                       description="polm:arithmetic-worked with each solution along one of several valid paths"),
    )
    register("shapes", BundledDataset(shapes_rows, description=(
        "images of coloured shapes (PIL) with questions on colour, shape, count and position")))
    register("shapes-captions", BundledDataset(shapes_caption_rows, description=(
        "one-line captions of shape images, for an align stage")))
    register("tones", BundledDataset(tones_rows, description=(
        "WAV clips of beeps (numpy) with questions on their number and whether the pitch rises or falls")))
    register("tones-captions", BundledDataset(tones_caption_rows, description=(
        "one-line captions of beep clips, for an align stage")))
    register(
        "arithmetic-prefs",
        BundledDataset(partial(arithmetic_preference_rows),
                       description="preference pairs: the correct answer over a plausible wrong one"),
    )
    from polm.modalities.text.tasks.lore import PASSAGE_SPLITS, QUESTION_SPLITS, lore_passage_rows, lore_rows

    register("lore", BundledDataset(lore_rows, splits=QUESTION_SPLITS, description=(
        "questions about invented towns, answered from polm:lore-passages (train, test, added towns)")))
    register("lore-passages", BundledDataset(lore_passage_rows, splits=PASSAGE_SPLITS, description=(
        "one passage per invented town, for a retriever's document store (train, added, all)")))
    from polm.modalities.text.tasks.arithmetic_chains import arithmetic_step_rows, arithmetic_think_rows

    register(
        "arithmetic-think",
        BundledDataset(partial(arithmetic_think_rows),
                       description="multi-step questions with <think> steps </think><answer> solutions"),
    )
    register(
        "arithmetic-steps",
        BundledDataset(partial(arithmetic_step_rows),
                       description="step-labelled multi-step solutions, half with a wrong step (for a PRM)"),
    )
    from polm.modalities.text.tasks.facts import SPLITS as FACT_SPLITS
    from polm.modalities.text.tasks.facts import facts_rows

    register("facts", BundledDataset(facts_rows, splits=FACT_SPLITS, description=(
        "invented places' capitals, founders and languages: text to teach them, and 50 edit requests")))
