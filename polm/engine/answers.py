"""Extracting and comparing final answers, shared by evaluation and rewards."""

from __future__ import annotations

import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def extract_answer(completion: str) -> str:
    """The final answer in ``completion``.

    The last ``<answer>...</answer>`` span if there is one, else the last
    ``\\boxed{...}``, else the whole completion; stripped, trailing full stop dropped.
    """
    for pattern in (_ANSWER_TAG, _BOXED):
        found = pattern.findall(completion)
        if found:
            completion = found[-1]
            break
    return completion.strip().rstrip(".").strip()


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answers_match(completion: str, reference: str, tolerance: float = 0.0) -> bool:
    """Whether the answer extracted from ``completion`` equals ``reference``.

    Numbers compare by value within ``tolerance`` (absolute), text exactly
    after stripping and case folding.
    """
    predicted, expected = extract_answer(completion), extract_answer(reference)
    predicted_number, expected_number = _as_number(predicted), _as_number(expected)
    if predicted_number is not None and expected_number is not None:
        return abs(predicted_number - expected_number) <= tolerance
    return predicted.casefold() == expected.casefold()
