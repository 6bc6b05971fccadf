"""polm-domain-units: an example domain plugin, the one to copy to make yours.

A domain brings what adapting a model to one field takes. This one teaches unit conversions
("How many grams are in 3 kilograms?" -> "3000") and contributes, through two hooks:

- the dataset ``polm:units``: questions generated from a table of units, split into train and test by a
  stable hash of each question;
- the domain ``units``: that dataset, a recipe (SFT with LoRA) and an evaluator (exact match on the test
  split).

polm finds the module through the entry point in ``pyproject.toml``::

    [project.entry-points.polm]
    units = "polm_domain_units"
"""

from __future__ import annotations

import hashlib
from typing import Any

from polm import hookimpl
from polm.engine.data import BundledDataset, load_rows
from polm.engine.domains import Domain
from polm.engine.evaluation import exact_match

#: (larger unit, smaller unit, how many of the smaller make one of the larger).
CONVERSIONS = [
    ("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("centimetres", "millimetres", 10),
    ("kilograms", "grams", 1000), ("litres", "millilitres", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
]
#: One question in five is held out.
TEST_SHARE = 5


def units_rows(split: str) -> list[dict[str, Any]]:
    """Every question converting 1 to 20 of a larger unit into the smaller one, or back, in ``split``.

    A question is in the test split when the hash of its text falls in the first fifth: the same on every
    machine, and no question is on both sides.
    """
    rows = []
    for larger, smaller, factor in CONVERSIONS:
        for amount in range(1, 21):
            rows.append({"prompt": f"How many {smaller} are in {amount} {larger}?", "answer": str(amount * factor)})
            rows.append({"prompt": f"How many {larger} are {amount * factor} {smaller}?", "answer": str(amount)})
    held_out = [int(hashlib.sha256(row["prompt"].encode()).hexdigest(), 16) % TEST_SHARE == 0 for row in rows]
    return [row for row, test in zip(rows, held_out) if test == (split == "test")]


def evaluate_units(model, tokenizer, size: int = 100, max_new_tokens: int = 8) -> dict[str, float]:
    """Greedy exact match on the first ``size`` test questions (``polm domain eval units CKPT --option size=50``)."""
    return exact_match(model, tokenizer, load_rows("polm:units", "test")[:size], max_new_tokens)


#: What ``polm domain recipe units`` prints for ``polm run``: a recipe as a mapping (a YAML file's path works too).
RECIPE = {
    "model": "polm-tiny",
    "seed": 0,
    "output_dir": "runs/units",
    "stages": [{
        "name": "sft", "data": "polm:units", "tuning": "lora", "tuning_options": {"r": 16, "alpha": 32},
        "max_steps": 600, "batch_size": 32, "lr": 3.0e-3, "warmup_ratio": 0.05, "eval_size": 100,
        "max_new_tokens": 8,
    }],
}


@hookimpl
def polm_register_datasets(register):
    register("units", BundledDataset(units_rows, description="unit conversion questions with exact answers"))


@hookimpl
def polm_register_domains(register):
    register("units", Domain(description="unit conversions (lengths, masses, volumes, times)",
                             datasets=("units",), recipe=RECIPE, evaluator=evaluate_units,
                             metrics=("exact_match",)))
