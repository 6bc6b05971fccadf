"""Invented towns and their facts: questions whose answers are in a document store, not in any model's weights.

Every town has a made-up name and four facts, each a made-up name or a number no model can know, written
short enough that three passages and a question fit in ``polm-tiny``'s 256 positions::

    Velmor: river Ostrak; founded 1432; 312 thousand people; ruler Tarvin Quell.

One passage per town (``polm:lore-passages``) and one question per fact (``polm:lore``):
``{"prompt": "In what year was Velmor founded?", "answer": "1432", "town": "Velmor", "passage": "lore-17"}``.
The towns fall into three disjoint groups, which give the splits:

=========  ==========================================================  =====
split      questions about                                             towns
=========  ==========================================================  =====
``train``  towns a retrieval-augmented model is tuned on               400
``test``   towns whose passages are in the store but never trained on  60
``added``  towns whose passages are added to the store after training  60
=========  ==========================================================  =====

``polm:lore-passages`` has the splits ``train`` (the store a model is tuned with: the ``train`` and ``test``
towns' passages), ``added`` (the ``added`` towns') and ``all`` (both: the store after the passages are added).
A model answers a ``test`` question only by reading the passage it is given, and an ``added`` one only by
reading a passage it could not have seen in training. Names are unique across all towns, rivers and rulers,
so a question names exactly one passage. The same seed always gives the same towns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOWN_COUNTS = {"train": 400, "test": 60, "added": 60}
QUESTION_SPLITS = tuple(TOWN_COUNTS)
PASSAGE_SPLITS = ("train", "added", "all")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "k", "th", "m")


@dataclass(frozen=True)
class Town:
    """A town and its four facts."""

    index: int
    name: str
    river: str
    founded: int
    population: int
    ruler: str

    @property
    def passage_id(self) -> str:
        return f"lore-{self.index}"

    def passage(self) -> dict:
        """``{"id": "lore-17", "text": "Velmor: river Ostrak; ..."}``."""
        return {"id": self.passage_id, "text": (
            f"{self.name}: river {self.river}; founded {self.founded}; {self.population} thousand people; "
            f"ruler {self.ruler}.")}

    def questions(self) -> list[dict]:
        """One question per fact, with its answer and the passage that holds it."""
        asked = (
            (f"On which river is {self.name}?", self.river),
            (f"In what year was {self.name} founded?", str(self.founded)),
            (f"How many thousand people live in {self.name}?", str(self.population)),
            (f"Who rules {self.name}?", self.ruler),
        )
        return [{"prompt": prompt, "answer": answer, "town": self.name, "passage": self.passage_id}
                for prompt, answer in asked]


def _word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def lore_towns(seed: int = 0) -> dict[str, list[Town]]:
    """The towns of each question split (see the module docstring), every name unique.

    Args:
        seed: chooses the towns; the same seed always gives the same ones.
    """
    rng = random.Random(f"polm-lore:{seed}")
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = _word(rng, syllables)
            if word.casefold() not in used:
                used.add(word.casefold())
                return word

    towns: dict[str, list[Town]] = {}
    index = 0
    for split, count in TOWN_COUNTS.items():
        towns[split] = []
        for _ in range(count):
            towns[split].append(Town(index, fresh(2), fresh(2), rng.randint(1000, 1999), rng.randint(10, 989),
                                     f"{fresh(2)} {fresh(2)}"))
            index += 1
    return towns


def lore_rows(split: str, seed: int = 0) -> list[dict]:
    """The questions about the towns of ``split`` (``train``, ``test`` or ``added``), four per town.

    Raises:
        ValueError: an unknown split.
    """
    if split not in QUESTION_SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits = {list(QUESTION_SPLITS)}")
    return [question for town in lore_towns(seed)[split] for question in town.questions()]


def lore_passage_rows(split: str, seed: int = 0) -> list[dict]:
    """The passages of ``train`` (the ``train`` and ``test`` towns), ``added`` or ``all`` (every town).

    Raises:
        ValueError: an unknown split.
    """
    if split not in PASSAGE_SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits = {list(PASSAGE_SPLITS)}")
    towns = lore_towns(seed)
    chosen = {"train": towns["train"] + towns["test"], "added": towns["added"],
              "all": towns["train"] + towns["test"] + towns["added"]}[split]
    return [town.passage() for town in chosen]
