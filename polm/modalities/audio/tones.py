"""``polm:tones``: WAV clips of beeps synthesised with numpy, and questions with exact answers.

Each clip is 2 s of 8 kHz 16-bit mono (read and resampled to 16 kHz like any
WAV) holding one to four sine beeps of 120 ms at random times, pitches
between 300 and 2000 Hz. Questions (the ``skill`` field):

=========  ====================================  ==============  ======
skill      question                              answers         chance
=========  ====================================  ==============  ======
count      How many beeps are there?             1, 2, 3, 4      1/4
pitch      Does the pitch rise or fall?          rises, falls    1/2
=========  ====================================  ==============  ======

Pitch clips have two to four beeps whose pitch moves one way. ``polm:tones-captions``
describes clips in one line ("3 beeps, pitch rises"), the data of an ``align`` stage.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from polm.engine.data import Row
from polm.modalities.multimodal.tasks import audio_question, generated_rows

RATE = 8000
SECONDS = 2.0
BEEP = 0.12
SKILLS = {"count": "How many beeps are there?", "pitch": "Does the pitch rise or fall?"}
CHANCE = {"count": 1 / 4, "pitch": 1 / 2}
SPLIT_SIZES = {"train": 2000, "test": 400}


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    """Save float samples in [-1, 1] as 16-bit mono PCM WAV."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def synthesise(rng: np.random.Generator, pitches: list[float]) -> np.ndarray:
    """A clip with one beep per pitch, in order, at random non-overlapping times, and a little noise."""
    length, beep = int(RATE * SECONDS), int(RATE * BEEP)
    gap = beep // 2
    slack = length - len(pitches) * (beep + gap)
    cuts = np.sort(rng.integers(0, slack, size=len(pitches)))  # free time before each beep
    clip = rng.normal(0, 0.01, length)
    envelope = np.minimum(1, np.minimum(np.arange(beep), np.arange(beep)[::-1]) / (0.01 * RATE))  # 10 ms fades
    for index, pitch in enumerate(pitches):
        start = int(cuts[index]) + index * (beep + gap)
        clip[start: start + beep] += 0.5 * envelope * np.sin(2 * np.pi * pitch * np.arange(beep) / RATE)
    return clip


def _pitches(rng: np.random.Generator, count: int, direction: str | None) -> list[float]:
    """``count`` pitches in Hz; with a direction (``rises``/``falls``), sorted and spanning at least a factor 1.3."""
    while True:
        pitches = sorted(np.exp(rng.uniform(np.log(300), np.log(2000), size=count)))
        if direction is None:
            return list(rng.permutation(pitches))
        if count == 1 or pitches[-1] / pitches[0] >= 1.3:  # an audible movement
            return pitches[::-1] if direction == "falls" else pitches


def _make_questions(rng: np.random.Generator, folder: Path, size: int) -> list[Row]:
    rows = []
    for index in range(size):
        skill = list(SKILLS)[index % len(SKILLS)]
        direction = str(rng.choice(["rises", "falls"])) if skill == "pitch" else None
        count = int(rng.integers(2, 5)) if skill == "pitch" else int(rng.integers(1, 5))
        path = folder / f"{index:05d}.wav"
        write_wav(path, synthesise(rng, _pitches(rng, count, direction)))
        answer = direction if skill == "pitch" else str(count)
        rows.append({"prompt": audio_question(path, SKILLS[skill]), "answer": answer, "skill": skill})
    return rows


def _make_captions(rng: np.random.Generator, folder: Path, size: int) -> list[Row]:
    rows = []
    for index in range(size):
        count = int(rng.integers(1, 5))
        direction = str(rng.choice(["rises", "falls"]))
        path = folder / f"{index:05d}.wav"
        write_wav(path, synthesise(rng, _pitches(rng, count, direction)))
        text = "1 beep" if count == 1 else f"{count} beeps, pitch {direction}"
        rows.append({"prompt": audio_question(path, "Describe the sound."), "answer": text})
    return rows


def tones_rows(split: str, size: int | None = None, seed: int = 0) -> list[Row]:
    """Question rows of ``polm:tones`` (``{prompt, answer, skill}``; 2000 train, 400 test by default)."""
    return generated_rows("tones", split, seed, size or SPLIT_SIZES[split], _make_questions)


def tones_caption_rows(split: str, size: int | None = None, seed: int = 0) -> list[Row]:
    """Caption rows of ``polm:tones-captions`` (``{prompt, answer}``)."""
    return generated_rows("tones-captions", split, seed, size or SPLIT_SIZES[split], _make_captions)
