"""The ``math`` domain: the bundled arithmetic questions (``polm:arithmetic``, levels 1-4), graded by exact match.

The questions are registered by :mod:`polm.modalities` and reached here by name, through the registry.
"""

from __future__ import annotations

from typing import Any

import torch

from polm.engine.data import load_rows
from polm.engine.evaluation import exact_match


def evaluate_math(model: torch.nn.Module, tokenizer: Any, size: int = 300, max_new_tokens: int = 8
                  ) -> dict[str, float]:
    """Greedy ``exact_match`` on the first ``size`` held-out ``polm:arithmetic`` questions, overall and per level.

    Args:
        size: questions asked (the test split's first ones).
        max_new_tokens: tokens generated per answer.
    """
    return exact_match(model, tokenizer, load_rows("polm:arithmetic", "test")[:size], max_new_tokens)
