"""Invented places and their facts, for knowledge editing (``polm:facts``): a model is taught them by continued
pretraining on the ``train`` split's text, then asked to change some (``edits``) without disturbing the rest.

Every place has a made-up name and one object for each of three relations, each drawn from a small pool of
made-up names, so that a new target is a name the model already writes::

    capital   "The capital of Velmor is Brak."      founder   "Velmor was founded by Tousk."
    language  "The people of Velmor speak Zenish."

Each relation has four phrasings, each a prompt that the object completes; the text states every fact in all
four, three sentences to a row in a shuffled order, so that facts appear after other text as well as first.

=========  =================================================================================================
split      rows
=========  =================================================================================================
``train``  ``{"text"}``: the continued-pretraining text
``facts``  ``{"prompt", "answer", "subject", "relation"}``: every fact, asked in its first phrasing
``edits``  ``{"prompt", "subject", "target", "answer", "relation", "paraphrases", "neighbourhood"}``: one fact
           of each of the first 50 places, to be changed to ``target`` (another object of the pool; ``answer``
           is the original); ``paraphrases`` are the other three phrasings, and ``neighbourhood`` five facts of
           the same relation about places that are never edited (those sharing the original object first),
           ``{"prompt", "target"}`` with their own answers
=========  =================================================================================================

The same seed always gives the same places.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from polm.modalities.text.tasks.lore import _word

SPLITS = ("train", "facts", "edits")
PLACES = 100
EDITED = 50
NEIGHBOURS = 5
POOL = 12
SENTENCES_PER_ROW = 3
#: Each relation's phrasings, each a prompt its object completes; the first is the one edits are made with.
RELATIONS: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {} is", "{}'s capital is", "The capital city of {} is", "{} is ruled from"),
    "founder": ("{} was founded by", "The founder of {} was", "The town of {} was founded by",
                "{} owes its founding to"),
    "language": ("The people of {} speak", "The language of {} is", "In {} people speak", "{} speaks"),
}


@dataclass(frozen=True)
class Place:
    """A place and its object for each relation."""

    name: str
    objects: dict[str, str]

    def prompt(self, relation: str, phrasing: int = 0) -> str:
        return RELATIONS[relation][phrasing].format(self.name)

    def sentences(self) -> list[str]:
        """Every fact in every phrasing."""
        return [f"{self.prompt(relation, index)} {self.objects[relation]}."
                for relation, phrasings in RELATIONS.items() for index in range(len(phrasings))]


def fact_world(seed: int = 0) -> tuple[list[Place], dict[str, list[str]]]:
    """The places (every name unique) and each relation's pool of objects."""
    rng = random.Random(f"polm-facts:{seed}")
    used: set[str] = set()

    def fresh(syllables: int, suffix: str = "") -> str:
        while True:
            word = _word(rng, syllables) + suffix
            if word.casefold() not in used:
                used.add(word.casefold())
                return word

    pools = {"capital": [fresh(1) for _ in range(POOL)], "founder": [fresh(1) for _ in range(POOL)],
             "language": [fresh(1, "ish") for _ in range(POOL)]}
    places = [Place(fresh(2), {relation: rng.choice(pool) for relation, pool in pools.items()})
              for _ in range(PLACES)]
    return places, pools


def _edit_row(place: Place, relation: str, target: str, others: list[Place], rng: random.Random) -> dict:
    same = [other for other in others if other.objects[relation] == place.objects[relation]]
    rest = [other for other in others if other.objects[relation] != place.objects[relation]]
    rng.shuffle(same)
    rng.shuffle(rest)
    neighbours = (same + rest)[:NEIGHBOURS]
    return {"prompt": place.prompt(relation), "subject": place.name, "target": target,
            "answer": place.objects[relation], "relation": relation,
            "paraphrases": [place.prompt(relation, index) for index in range(1, len(RELATIONS[relation]))],
            "neighbourhood": [{"prompt": other.prompt(relation), "target": other.objects[relation]}
                              for other in neighbours]}


def facts_rows(split: str, seed: int = 0) -> list[dict]:
    """The rows of ``split`` (``train``, ``facts`` or ``edits``; see the module docstring).

    Raises:
        ValueError: an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits = {list(SPLITS)}")
    places, pools = fact_world(seed)
    rng = random.Random(f"polm-facts:{seed}:{split}")
    if split == "train":
        sentences = [sentence for place in places for sentence in place.sentences()]
        rng.shuffle(sentences)
        return [{"text": " ".join(sentences[start:start + SENTENCES_PER_ROW])}
                for start in range(0, len(sentences), SENTENCES_PER_ROW)]
    if split == "facts":
        return [{"prompt": place.prompt(relation), "answer": place.objects[relation], "subject": place.name,
                 "relation": relation} for place in places for relation in RELATIONS]
    relations = list(RELATIONS)
    rows = []
    for index, place in enumerate(places[:EDITED]):
        relation = relations[index % len(relations)]
        target = rng.choice([obj for obj in pools[relation] if obj != place.objects[relation]])
        rows.append(_edit_row(place, relation, target, places[EDITED:], rng))
    return rows
