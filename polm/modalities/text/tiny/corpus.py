"""The synthetic pretraining corpus of polm-tiny.

polm-tiny should behave like a small real base model: it knows arithmetic
notation and the arithmetic itself, because its corpus is full of equations,
sentences about sums and products, counting and times tables, but it has never
seen the question-and-answer format of the arithmetic task (``What is 37 + 48?``
followed by the answer) nor any chat token. Teaching that format is left to
post-training.

Facts whose expression is a question of the held-out test split (seed 0) are
left out in every form, symbols or words, so accuracy on that split is
accuracy on sums the model has not seen (commuted twins such as ``5 + 37`` for
``37 + 5`` can still appear, as they would in real text).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

Expression = tuple[tuple[int, ...], tuple[str, ...]]

# (weight, sampler) pairs. They cover the operand ranges and operations of the
# arithmetic task, plus bridges between them (two-digit with one-digit, the
# one-digit times table) that make the digit-level rules easier to learn.
_FAMILIES: list[tuple[float, Callable[[random.Random], Expression]]] = [
    (1.5, lambda rng: _two(rng, 0, 9, 0, 9, "+-")),
    (0.5, lambda rng: _two(rng, 0, 9, 0, 9, "*")),
    (3.0, lambda rng: _two(rng, 10, 99, 0, 9, "+-")),
    (3.0, lambda rng: _two(rng, 10, 99, 10, 99, "+-")),
    (1.5, lambda rng: _two(rng, 10, 99, 2, 9, "*")),
    (0.5, lambda rng: _three(rng)),
]

_NAMES = [
    "Ada",
    "Ben",
    "Cleo",
    "Dan",
    "Eva",
    "Finn",
    "Gus",
    "Hana",
    "Ivo",
    "Jade",
    "Kai",
    "Lena",
    "Max",
    "Nora",
]
_THINGS = ["apples", "books", "coins", "stamps", "marbles", "shells", "cards", "pens", "eggs", "stones"]
_ANIMALS = ["cat", "dog", "bird", "fox", "horse", "rabbit", "owl", "fish"]
_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey"]
_PLACES = ["garden", "kitchen", "park", "school", "market", "river", "forest", "library"]
_ADJECTIVES = ["small", "big", "old", "new", "happy", "quiet", "fast", "slow", "warm", "cold"]
_VERBS = ["sees", "likes", "finds", "draws", "follows", "feeds", "paints", "watches"]


def _evaluate(operands: tuple[int, ...], ops: tuple[str, ...]) -> int:
    value = operands[0]
    for op, operand in zip(ops, operands[1:]):
        value = value * operand if op == "*" else value + operand if op == "+" else value - operand
    return value


def _two(rng: random.Random, low_a: int, high_a: int, low_b: int, high_b: int, ops: str) -> Expression:
    a, b = rng.randint(low_a, high_a), rng.randint(low_b, high_b)
    op = rng.choice(ops)
    if op == "-" and a < b:
        a, b = b, a
    if op != "-" and rng.random() < 0.5:
        a, b = b, a
    return (a, b), (op,)


def _three(rng: random.Random) -> Expression:
    ops = rng.choice((("+", "-"), ("-", "+"), ("+", "+")))
    while True:
        operands = tuple(rng.randint(10, 99) for _ in range(3))
        if _evaluate(operands, ops) >= 0:
            return operands, ops


def _text(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    parts = [str(operands[0])]
    for op, operand in zip(ops, operands[1:]):
        parts += [op, str(operand)]
    return " ".join(parts)


def _sentence(rng: random.Random, operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    """One arithmetic fact in words (or, for three operands, half in symbols)."""
    result = _evaluate(operands, ops)
    if len(ops) == 2:
        words = {"+": "plus", "-": "minus"}
        a, b, c = operands
        return rng.choice(
            [
                f"{a} {words[ops[0]]} {b} {words[ops[1]]} {c} equals {result}.",
                f"{_text(operands, ops)} is {result}.",
                f"If we work out {_text(operands, ops)}, we get {result}.",
            ]
        )
    (a, b), op = operands, ops[0]
    name, things = rng.choice(_NAMES), rng.choice(_THINGS)
    templates = {
        "+": [
            f"{a} plus {b} equals {result}.",
            f"The sum of {a} and {b} is {result}.",
            f"Adding {a} and {b} gives {result}.",
            f"{name} has {a} {things} and gets {b} more, so {name} has {result} {things}.",
        ],
        "-": [
            f"{a} minus {b} equals {result}.",
            f"The difference between {a} and {b} is {result}.",
            f"Taking {b} away from {a} leaves {result}.",
            f"{name} has {a} {things} and gives away {b}, so {result} {things} are left.",
        ],
        "*": [
            f"{a} times {b} equals {result}.",
            f"The product of {a} and {b} is {result}.",
            f"{b} groups of {a} make {result}." if b > 1 else f"{a} times {b} is {result}.",
            f"{name} buys {b} boxes of {a} {things}, which is {result} {things}.",
        ],
    }
    return rng.choice(templates[op])


def _counting(rng: random.Random) -> str:
    step = rng.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 25])
    length = rng.randint(6, 14)
    if rng.random() < 0.3:
        start = rng.randint(step * length, step * length + 100)
        numbers = [start - step * i for i in range(length)]
        return f"Counting down by {step} from {start}: " + ", ".join(map(str, numbers)) + "."
    start = rng.choice([0, step, rng.randint(0, 90)])
    numbers = [start + step * i for i in range(length)]
    return f"Counting by {step}: " + ", ".join(map(str, numbers)) + "."


def _times_table(rng: random.Random) -> str:
    b = rng.randint(2, 9)
    start = rng.randint(1, 90)
    return "\n".join(f"{a} * {b} = {a * b}" for a in range(start, start + rng.randint(4, 9)))


def _numbers(rng: random.Random) -> str:
    values = [rng.randint(0, 199) for _ in range(rng.randint(3, 8))]
    a, b = values[0], values[1]
    relation = "greater than" if a > b else "less than" if a < b else "equal to"
    return rng.choice(
        [
            "The numbers are " + ", ".join(map(str, values)) + ".",
            f"{a} is {relation} {b}.",
            "Sorted, they read " + ", ".join(map(str, sorted(values))) + ".",
            f"The largest of {', '.join(map(str, values))} is {max(values)}.",
        ]
    )


def _prose(rng: random.Random) -> str:
    """Everyday English, questions included, but never about numbers."""
    name, other = rng.sample(_NAMES, 2)
    animal, colour, place = rng.choice(_ANIMALS), rng.choice(_COLOURS), rng.choice(_PLACES)
    adjective, verb = rng.choice(_ADJECTIVES), rng.choice(_VERBS)
    sentences = [
        f"{name} {verb} a {adjective} {animal} in the {place}.",
        f"What is the {animal} doing? It is sleeping in the {place}.",
        f"What is the colour of the {animal}? It is {colour}.",
        f"Where is {other}? {other} is at the {place}.",
        f"Is the {animal} {adjective}? Yes, it is.",
        f"Is the {place} {adjective}? No, it is not.",
        f"{name} asks {other} a question, and {other} answers it.",
        f"The {animal} is {colour} and very {adjective}.",
        f"Who is in the {place}? {name} is.",
        f"What is your name? My name is {name}.",
        f"{name} and {other} walk to the {place} together.",
        f"This is a {adjective} day, says {name}.",
    ]
    return " ".join(rng.sample(sentences, rng.randint(2, 5)))


def pretraining_documents(seed: int, held_out: set[str]) -> Iterator[str]:
    """An endless, deterministic stream of pretraining documents.

    Args:
        seed: chooses the documents.
        held_out: expressions (``"37 + 48"``) whose facts must not appear.

    Yields:
        Documents of a few lines each, without separators.
    """
    rng = random.Random(f"polm-tiny-corpus:{seed}")
    weights = [weight for weight, _ in _FAMILIES]
    samplers = [sampler for _, sampler in _FAMILIES]

    def fact() -> Expression:
        while True:
            operands, ops = rng.choices(samplers, weights=weights)[0](rng)
            if _text(operands, ops) not in held_out:
                return operands, ops

    while True:
        kind = rng.random()
        lines = rng.randint(3, 10)
        if kind < 0.65:
            facts = [fact() for _ in range(lines)]
            yield "\n".join(f"{_text(*f)} = {_evaluate(*f)}" for f in facts)
        elif kind < 0.80:
            yield " ".join(_sentence(rng, *fact()) for _ in range(lines))
        elif kind < 0.85:
            yield _counting(rng)
        elif kind < 0.90:
            table = _times_table(rng)
            if not any(line.split(" = ")[0] in held_out for line in table.splitlines()):
                yield table
        elif kind < 0.93:
            yield " ".join(_numbers(rng) for _ in range(rng.randint(1, 3)))
        else:
            yield _prose(rng)
