"""Multi-step arithmetic for reasoning: worked solutions, and step-labelled solutions with deliberate mistakes.

Each question chains two or three operations on one-digit numbers, e.g.
``What is (3 + 4) * 5?``, solved one operation per line::

    <think>3 + 4 = 7
    7 * 5 = 35</think><answer>35</answer>

=====  =======================================  =========================
level  chain                                    example
=====  =======================================  =========================
2      ``(a ± b) op c``                         ``(3 + 4) * 5``
3      ``((a ± b) op c) ± d``                   ``((3 + 4) * 5) - 8``
=====  =======================================  =========================

Every operand has one digit; a multiplication is of a one-digit value, and
every intermediate value is positive, so each step is as hard as level 1-2 of
``polm:arithmetic`` and the difficulty is in chaining them. ``polm:arithmetic-think`` rows
are ``{prompt, completion, answer, level}`` (SFT, and GRPO with the ``format``
reward); ``polm:arithmetic-steps`` rows are ``{prompt, completion, steps, labels, answer,
level}`` for training a process reward model; their steps are the lines of the
solution and its ``<answer>`` block. Half of the step-labelled solutions
contain one mistake: a wrong result (off by 1, 2 or 10, or two digits
swapped), an operand miscopied from the question (the step then computes
correctly from it; the later steps compute correctly from the wrong value), or
a final answer that is not the last line's result. A step's label is 1
while the solution is still right and 0 from the first wrong step on (the
"still on track" labels of Math-Shepherd, arXiv:2312.08935).

The test split is a fixed pool of distinct questions from its own random
stream; the train split never asks a test question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from polm.modalities.text.tasks.arithmetic import OPERATIONS, SPLITS, worked_solution

# 50 000 train rows, so that an SFT stage of a few hundred steps never repeats a question: from
# 5 000 rows, 300 steps of 32 memorised them (99.9% token accuracy) and reached 67% held-out; from
# 50 000 the same stage reached 71.5%.
DEFAULT_SIZES = {"train": 50_000, "test": 200}
TEST_POOL_SIZE = 200


@dataclass(frozen=True)
class _Step:
    left: int
    op: str
    right: int

    @property
    def value(self) -> int:
        return OPERATIONS[self.op](self.left, self.right)

    def text(self, value: int | None = None) -> str:
        return f"{self.left} {self.op} {self.right} = {self.value if value is None else value}"


@dataclass(frozen=True)
class _Chain:
    start: int
    operations: tuple[tuple[str, int], ...]  # (op, operand) applied in order

    @property
    def expression(self) -> str:
        text = str(self.start)
        for index, (op, operand) in enumerate(self.operations):
            text = f"({text} {op} {operand})" if index < len(self.operations) - 1 else f"{text} {op} {operand}"
        return text

    @property
    def prompt(self) -> str:
        return f"What is {self.expression}?"

    def steps(self, start: int | None = None) -> list[_Step]:
        """The worked steps, each starting from the previous result (``start`` replaces the first operand)."""
        steps, value = [], self.start if start is None else start
        for op, operand in self.operations:
            steps.append(_Step(value, op, operand))
            value = steps[-1].value
        return steps

    @property
    def answer(self) -> int:
        return self.steps()[-1].value


def _draw(rng: random.Random) -> _Chain:
    length = rng.choice((2, 3))
    value = rng.randint(2, 9)
    start, operations = value, []
    for index in range(length):
        ops = "+-*" if index == 1 and value <= 9 else "+-"  # one multiplication at most, of one digit by one digit
        op = rng.choice(ops if value >= 2 else ops.replace("-", ""))
        operand = rng.randint(1, min(value - 1, 9)) if op == "-" else rng.randint(2 if op == "*" else 1, 9)
        operations.append((op, operand))
        value = OPERATIONS[op](value, operand)
    return _Chain(start, tuple(operations))


def _chains(split: str, size: int | None, seed: int) -> list[_Chain]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits = {list(SPLITS)}")
    size = DEFAULT_SIZES[split] if size is None else size
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    rng = random.Random(f"polm-arithmetic-chains:{seed}:test")
    pool: dict[str, _Chain] = {}
    while len(pool) < TEST_POOL_SIZE:
        chain = _draw(rng)
        pool.setdefault(chain.expression, chain)
    if split == "test":
        if size > TEST_POOL_SIZE:
            raise ValueError(f"The test split holds {TEST_POOL_SIZE} questions, asked for {size}")
        return list(pool.values())[:size]
    rng = random.Random(f"polm-arithmetic-chains:{seed}:train")
    chains: list[_Chain] = []
    while len(chains) < size:
        chain = _draw(rng)
        if chain.expression not in pool:
            chains.append(chain)
    return chains


def arithmetic_think_rows(split: str, size: int | None = None, seed: int = 0) -> list[dict]:
    """Multi-step questions with worked solutions.

    Args:
        split: ``"train"`` or ``"test"``.
        size: number of rows; defaults to 50 000 for train and 200 for test (the whole test pool).
        seed: chooses the questions; the same arguments always give the same rows.

    Returns:
        Rows ``{"prompt", "completion", "answer", "level"}``, ``level`` the number of steps.

    Raises:
        ValueError: for an unknown split, a negative size or a test size above the pool.
    """
    rows = []
    for chain in _chains(split, size, seed):
        steps = [step.text() for step in chain.steps()]
        rows.append({"prompt": chain.prompt, "completion": worked_solution(steps, str(chain.answer)),
                     "answer": str(chain.answer), "level": len(steps)})
    return rows


def _mistake(value: int, rng: random.Random) -> int:
    """A plausible wrong result: off by 1, 2 or 10, or its last two digits swapped."""
    candidates = [value + delta for delta in (-10, -2, -1, 1, 2, 10)]
    digits = str(value)
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        candidates.append(int(digits[:-2] + digits[-1] + digits[-2]))
    return rng.choice(sorted({candidate for candidate in candidates if candidate >= 0 and candidate != value}))


def _other_operand(step: _Step, rng: random.Random) -> int:
    """A one-digit right operand other than the question's, keeping a difference positive."""
    highest = min(step.left - 1, 9) if step.op == "-" else 9
    choices = [digit for digit in range(1, highest + 1) if digit != step.right] or [step.right + 1]
    return rng.choice(choices)


def arithmetic_step_rows(split: str, size: int | None = None, seed: int = 0) -> list[dict]:
    """Step-labelled solutions of the questions of :func:`arithmetic_think_rows`, half with one mistake.

    Args and Raises are those of :func:`arithmetic_think_rows`.

    Returns:
        Rows ``{"prompt", "completion", "steps", "labels", "answer", "level"}``: ``completion`` the
        worked solution as the policy writes it, ``steps`` its lines followed by its
        ``<answer>...</answer>`` block, ``labels`` 1 for each step while the solution is right and 0
        from its first wrong step on; ``answer`` is the correct final answer.
    """
    rng = random.Random(f"polm-arithmetic-chains:{seed}:{split}:mistakes")
    rows = []
    for chain in _chains(split, size, seed):
        steps = chain.steps()
        wrong = rng.randrange(len(steps) + 1) if rng.random() < 0.5 else None  # len(steps): the answer
        texts, labels, carried = [], [], None
        for index, step in enumerate(steps):
            if carried is not None:  # after a mistake the solution goes on from the wrong value
                step = _Step(carried, step.op, step.right)
            value = step.value
            if index == wrong and rng.random() < 0.5:  # a miscopied operand, computed correctly from
                step = _Step(step.left, step.op, _other_operand(step, rng))
                value = step.value
            elif index == wrong:  # a wrong result
                value = _mistake(step.value, rng)
            texts.append(step.text(value))
            labels.append(int(wrong is None or index < wrong))
            carried = value if wrong is not None and index >= wrong else None
        final = int(texts[-1].split(" = ")[-1])
        written = _mistake(final, rng) if wrong == len(steps) else final  # an answer copied wrongly
        completion = worked_solution(texts, str(written))
        rows.append({"prompt": chain.prompt, "completion": completion, "steps": texts + [f"<answer>{written}</answer>"],
                     "labels": labels + [int(wrong is None)], "answer": str(chain.answer), "level": len(steps)})
    return rows
