"""Deterministic synthetic arithmetic questions, graded by difficulty.

Every question is ``What is <expression>?`` with a non-negative integer answer:

=====  ====================================  =====
level  what                                  share
=====  ====================================  =====
1      one-digit ``a + b`` and ``a - b``     25 %
2      two-digit and one-digit, ``a ± b``    35 %
3      two-digit and two-digit, ``a ± b``    25 %
4      two-digit times one-digit, ``a * b``  15 %
=====  ====================================  =====

Subtractions never go below zero. A small model that knows the notation does
levels 1-2 well after brief fine-tuning (polm-tiny does); levels 3-4 need the
carry of one column to decide the digit before it, which small models learn
slowly, and leave headroom for reinforcement learning.

The test split is a fixed pool of ``TEST_POOL_SIZE`` distinct questions drawn
from its own random stream; ``size`` takes a prefix of it. The train split
comes from another stream and skips every question of the pool, so the splits
never share a prompt (train may repeat its own prompts: level 1 has only 155).

``polm:arithmetic-worked`` asks the same questions with worked solutions in the
``<think>``/``<answer>`` format of the reasoning stages (:func:`arithmetic_worked_rows`);
``polm:arithmetic-paths`` solves each along one of its several valid paths (:func:`arithmetic_paths_rows`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 20_000, "test": 300}
WORKED_TRAIN_SIZE = 50_000
TEST_POOL_SIZE = 300
LEVEL_WEIGHTS = (0.25, 0.35, 0.25, 0.15)
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class _Question:
    a: int
    op: str
    b: int
    level: int

    @property
    def expression(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def answer(self) -> int:
        return OPERATIONS[self.op](self.a, self.b)

    def row(self) -> dict:
        return {"prompt": f"What is {self.expression}?", "answer": str(self.answer), "level": self.level}


def _draw(rng: random.Random) -> _Question:
    level = rng.choices((1, 2, 3, 4), weights=LEVEL_WEIGHTS)[0]
    if level == 4:
        return _Question(rng.randint(10, 99), "*", rng.randint(2, 9), level)
    # The first operand has the most digits, and b <= a keeps differences non-negative.
    low_a, high_a, low_b, high_b = {1: (0, 9, 0, 9), 2: (10, 99, 0, 9), 3: (10, 99, 10, 99)}[level]
    a, b = rng.randint(low_a, high_a), rng.randint(low_b, high_b)
    if rng.random() < 0.5:
        return _Question(a, "+", b, level)
    return _Question(max(a, b), "-", min(a, b), level)


def _test_pool(seed: int) -> list[_Question]:
    rng = random.Random(f"polm-arithmetic:{seed}:test")
    pool: dict[str, _Question] = {}
    while len(pool) < TEST_POOL_SIZE:
        question = _draw(rng)
        pool.setdefault(question.expression, question)
    return list(pool.values())


def _questions(split: str, size: int | None, seed: int) -> list[_Question]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits = {list(SPLITS)}")
    size = DEFAULT_SIZES[split] if size is None else size
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    pool = _test_pool(seed)
    if split == "test":
        if size > TEST_POOL_SIZE:
            raise ValueError(f"The test split holds {TEST_POOL_SIZE} questions, asked for {size}")
        return pool[:size]
    held_out = {question.expression for question in pool}
    rng = random.Random(f"polm-arithmetic:{seed}:train")
    questions: list[_Question] = []
    while len(questions) < size:
        question = _draw(rng)
        if question.expression not in held_out:
            questions.append(question)
    return questions


def arithmetic_rows(split: str, size: int | None = None, seed: int = 0) -> list[dict]:
    """Arithmetic questions with their answers.

    Args:
        split: ``"train"`` or ``"test"``.
        size: number of rows; defaults to 20 000 for train and 300 for test
            (the whole test pool, which is also the most it can give).
        seed: chooses the questions; the same arguments always give the same rows.

    Returns:
        Rows ``{"prompt": "What is 37 + 48?", "answer": "85", "level": 3}``.

    Raises:
        ValueError: for an unknown split, a negative size or a test size above the pool.
    """
    return [question.row() for question in _questions(split, size, seed)]


def worked_solution(steps: list[str], answer: str) -> str:
    """The reasoning completion format: ``<think>`` one step per line ``</think><answer>...</answer>``."""
    return "<think>" + "\n".join(steps) + f"</think><answer>{answer}</answer>"


def _solution_paths(question: _Question) -> list[list[str]]:
    """The ways polm solves ``question`` step by step, one operation per line; the first works a place value at a time.

    Place value first (:func:`arithmetic_worked_rows`): ``64 * 6``: ``60 * 6 = 360``, ``4 * 6 = 24``,
    ``360 + 24 = 384``; ``37 + 48``: ``37 + 40 = 77``, ``77 + 8 = 85``; a one-digit right operand is a
    single step. Each line but a product's last is a level 1-2 operation or one on a round number; that
    last line adds a number under 100 to a round one. The other paths take the units first
    (``37 + 8 = 45``, ``45 + 40 = 85``; ``4 * 6 = 24``, ``60 * 6 = 360``, ``24 + 360 = 384``), add the
    tens and the units of both operands apart (``30 + 40 = 70``, ``7 + 8 = 15``, ``70 + 15 = 85``), or add
    a one-digit number to the units of a two-digit one (``2 + 3 = 5``, ``60 + 5 = 65`` for ``62 + 3``).
    """
    a, op, b, answer = question.a, question.op, question.b, question.answer
    if op == "*":
        tens, units = a // 10 * 10, a % 10
        if not units:
            return [[f"{tens} * {b} = {answer}"]]
        tens_line, units_line = f"{tens} * {b} = {tens * b}", f"{units} * {b} = {units * b}"
        return [[tens_line, units_line, f"{tens * b} + {units * b} = {answer}"],
                [units_line, tens_line, f"{units * b} + {tens * b} = {answer}"]]
    if b < 10:
        paths = [[f"{a} {op} {b} = {answer}"]]
        if op == "+" and a > 10 and a % 10:  # a round or one-digit left operand has no units to add to
            tens_a, units_a = a // 10 * 10, a % 10
            paths.append([f"{units_a} + {b} = {units_a + b}", f"{tens_a} + {units_a + b} = {answer}"])
        return paths
    tens, units = b // 10 * 10, b % 10
    if not units:
        return [[f"{a} {op} {b} = {answer}"]]
    operation = OPERATIONS[op]
    tens_first, units_first = operation(a, tens), operation(a, units)
    paths = [[f"{a} {op} {tens} = {tens_first}", f"{tens_first} {op} {units} = {answer}"],
             [f"{a} {op} {units} = {units_first}", f"{units_first} {op} {tens} = {answer}"]]
    if op == "+":
        tens_a, units_a = a // 10 * 10, a % 10
        paths.append([f"{tens_a} + {tens} = {tens_a + tens}", f"{units_a} + {units} = {units_a + units}",
                      f"{tens_a + tens} + {units_a + units} = {answer}"])
    return paths


def _solved_rows(split: str, size: int | None, seed: int, choose: Callable[[list[list[str]]], list[str]]) -> list[dict]:
    """Rows of :func:`arithmetic_rows` with a ``completion`` solving each along ``choose(paths)``."""
    size = WORKED_TRAIN_SIZE if split == "train" and size is None else size
    rows = []
    for question in _questions(split, size, seed):
        row = question.row()
        row["completion"] = worked_solution(choose(_solution_paths(question)), row["answer"])
        rows.append(row)
    return rows


def arithmetic_worked_rows(split: str, size: int | None = None, seed: int = 0) -> list[dict]:
    """The questions of :func:`arithmetic_rows` with worked solutions, for reasoning stages.

    The same arguments give the same questions as :func:`arithmetic_rows`, so the test split is
    polm:arithmetic's; the train split defaults to 50 000 rows (a few hundred SFT steps of 32 then
    never repeat a question) and Raises are those of :func:`arithmetic_rows`. Every solution works a
    place value at a time, so a question has exactly one.

    Returns:
        Rows ``{"prompt", "completion", "answer", "level"}``, the completion
        ``<think>37 + 40 = 77\\n77 + 8 = 85</think><answer>85</answer>``.
    """
    return _solved_rows(split, size, seed, lambda paths: paths[0])


def arithmetic_paths_rows(split: str, size: int | None = None, seed: int = 0) -> list[dict]:
    """:func:`arithmetic_worked_rows` with each solution along one of the question's paths, drawn at random.

    Levels 2-4 have two or three valid ways to a question (place value first, units first, tens and
    units apart: :func:`_solution_paths`). A model fine-tuned on them samples several ways to one answer
    and slips in different places on each, which is what majority voting (self-consistency, Wang et al.
    2022, arXiv:2203.11171) and GRPO, which learns the way the model executes best, have to work with.
    Arguments, defaults and Raises are those of :func:`arithmetic_worked_rows`; the same arguments give
    the same rows.

    Returns:
        Rows ``{"prompt", "completion", "answer", "level"}``, e.g. the completion of ``What is 37 + 48?``
        ``<think>37 + 8 = 45\\n45 + 40 = 85</think><answer>85</answer>``.
    """
    rng = random.Random(f"polm-arithmetic:{seed}:{split}:paths")
    return _solved_rows(split, size, seed, rng.choice)


def _wrong_answer(question: _Question, rng: random.Random) -> int:
    """A plausible mistake: off by a little, the last two digits swapped, or the wrong operation."""
    right = question.answer
    candidates = [right + delta for delta in (-10, -2, -1, 1, 2, 10)]
    digits = str(right)
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        candidates.append(int(digits[:-2] + digits[-1] + digits[-2]))
    candidates += [operation(question.a, question.b) for operation in OPERATIONS.values()]
    return rng.choice(sorted({value for value in candidates if value >= 0 and value != right}))


def arithmetic_preference_rows(split: str, size: int | None = None, seed: int = 0) -> list[dict]:
    """Preference pairs over the same questions as :func:`arithmetic_rows`.

    Args and Raises are those of :func:`arithmetic_rows`.

    Returns:
        Rows ``{"prompt", "chosen", "rejected", "answer"}`` where ``chosen`` is the
        correct answer and ``rejected`` a plausible wrong one.
    """
    rng = random.Random(f"polm-arithmetic:{seed}:{split}:rejected")
    rows = []
    for question in _questions(split, size, seed):
        answer = str(question.answer)
        rows.append(
            {
                "prompt": question.row()["prompt"],
                "chosen": answer,
                "rejected": str(_wrong_answer(question, rng)),
                "answer": answer,
            }
        )
    return rows
